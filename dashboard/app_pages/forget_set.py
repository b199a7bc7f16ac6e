"""Forget set: browse training images by class, pick by clicking, random k, filters, uploads, save/load."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st

from core.forget_ids import parse_forget_ids
from dashboard import resources as R
from dashboard import session as S
from dashboard import uploads

PER_PAGE = 24
COLS = 8

st.title("Forget set")
ds = R.get_dataset()
model_name = R.default_model_name()
classes = ds.class_names
sel = S.selection()
ids_np = ds.train.ids.numpy()
labels_np = ds.train.labels.numpy()
S.widget_defaults(fs_class=0, fs_filter="all", fs_conf=(0.0, 1.0), fs_k=16, fs_seed=0, fs_mode="overall",
                  fs_replace=True)

st.caption(f"{len(ds.train):,} training images of {ds.name} ({ds.source_kind}). Click a thumbnail's button to "
           "select or deselect it; hover and use the expand icon to see it larger.")


def _summary() -> None:
    n_up = len(S.uploads())
    counts = pd.Series(0, index=classes, dtype=int)
    if sel:
        pos = ds.train.positions(sorted(sel)).numpy()
        for lbl, n in zip(*np.unique(labels_np[pos], return_counts=True), strict=True):
            counts.iloc[int(lbl)] += int(n)
    for up in S.uploads():
        counts.iloc[up.label] += 1
    st.metric("Selected", f"{len(sel) + n_up}", help="training images + uploaded images")
    st.dataframe(counts.rename("images").to_frame(), width="stretch", height=390)


left, right = st.columns([4, 1])
with right:
    st.subheader("Selection")
    _summary()
    if st.button("Clear selection", width="stretch", disabled=not (sel or S.uploads())):
        S.set_selection([])
        S.uploads().clear()
        st.rerun()

with left:
    tab_browse, tab_random, tab_upload, tab_io = st.tabs(["Browse", "Random k", "Upload images", "Save / load"])

    with tab_browse:
        c1, c2, c3 = st.columns([2, 2, 3])
        label = c1.selectbox("Class", range(len(classes)), format_func=lambda i: classes[i], key="fs_class")
        flt = c2.selectbox("Show", ["all", "correctly classified", "misclassified"], key="fs_filter",
                           disabled=model_name is None, help="Uses the original model's predictions.")
        lo, hi = c3.slider("Model confidence", 0.0, 1.0, step=0.05, key="fs_conf",
                           disabled=model_name is None,
                           help="Confidence of the model in its own prediction (softmax maximum).")
        pos = R.class_positions(ds.name, int(label))
        conf = None
        if model_name is not None and (flt != "all" or (lo, hi) != (0.0, 1.0)):
            pred, conf = R.train_predictions(model_name, ds.name, int(label))
            keep = (conf >= lo) & (conf <= hi)
            if flt == "correctly classified":
                keep &= pred == label
            elif flt == "misclassified":
                keep &= pred != label
            pos, conf = pos[keep], conf[keep]
        n_pages = max(1, -(-len(pos) // PER_PAGE))
        st.caption(f"{len(pos):,} images match; page size {PER_PAGE}.")
        page = st.pagination(n_pages, key=f"fs_page_{label}_{flt}_{lo}_{hi}") if n_pages > 1 else 1
        start = (int(page) - 1) * PER_PAGE
        shown = pos[start:start + PER_PAGE]
        b1, b2 = st.columns(2)
        page_ids = [int(ids_np[p]) for p in shown]
        if b1.button("Select all on this page", disabled=not page_ids):
            sel.update(page_ids)
            st.rerun()
        if b2.button("Deselect all on this page", disabled=not page_ids):
            sel.difference_update(page_ids)
            st.rerun()
        grid = st.columns(COLS)
        for i, p in enumerate(shown):
            sid = int(ids_np[p])
            with grid[i % COLS]:
                chosen = sid in sel
                caption = f"#{sid}" + (f" · {conf[start + i]:.2f}" if conf is not None else "")
                st.image(R.thumbnail(ds.name, int(p)), caption=caption, width=R.THUMB_PX)
                st.button("✓ selected" if chosen else "select", key=f"tg_{sid}", on_click=S.toggle, args=(sid,),
                          type="primary" if chosen else "secondary", width="stretch")

    with tab_random:
        c1, c2, c3 = st.columns(3)
        mode = c1.radio("Draw", ["overall", "per class"], key="fs_mode", horizontal=True)
        k = c2.number_input("k" if mode == "overall" else "k per class", 1, 1024, key="fs_k")
        seed = c3.number_input("Seed", 0, 2**31 - 1, key="fs_seed")
        which = st.multiselect("Classes (empty = all)", range(len(classes)), format_func=lambda i: classes[i],
                               key="fs_random_classes")
        replace = st.toggle("Replace the current selection", key="fs_replace")
        if st.button("Draw random images", type="primary"):
            rng = np.random.default_rng(int(seed))
            pool_labels = which or list(range(len(classes)))
            if mode == "overall":
                pool = np.flatnonzero(np.isin(labels_np, pool_labels))
                drawn = rng.choice(pool, size=min(int(k), len(pool)), replace=False)
            else:
                drawn = np.concatenate([
                    rng.choice(pos_c, size=min(int(k), len(pos_c)), replace=False)
                    for pos_c in (R.class_positions(ds.name, c) for c in pool_labels)
                ])
            new = {int(ids_np[p]) for p in drawn}
            S.set_selection(new if replace else sel | new)
            st.success(f"Drew {len(new)} images.")
            st.rerun()

    with tab_upload:
        st.markdown(f"Add your own images to the forget set. They are resized to the dataset's input size "
                    f"{ds.input_shape[1]}×{ds.input_shape[2]} ({'grayscale' if ds.input_shape[0] == 1 else 'RGB'}). "
                    f"At most {uploads.MAX_FILES} files, {uploads.MAX_BYTES // 1_000_000} MB and "
                    f"{uploads.MAX_PIXELS:,} pixels each.")
        files = st.file_uploader("Images", type=sorted(uploads.SUFFIXES), accept_multiple_files=True,
                                 key=f"fs_up_{st.session_state.get('fs_up_rev', 0)}")
        label_mode = st.radio("Label", ["one class for all", "from file name (<class>_anything.png)"],
                              horizontal=True, key="fs_up_mode")
        up_label = st.selectbox("Class", classes, key="fs_up_class", disabled=label_mode != "one class for all")
        if st.button("Add uploaded images", disabled=not files):
            result = uploads.validate_uploads([(f.name, f.getvalue()) for f in files], classes, ds.input_shape,
                                              None if label_mode != "one class for all" else up_label)
            S.uploads().extend(S.Upload(u.name, u.pixels, u.label) for u in result.accepted)
            for err in result.errors:
                S.flash("error", err)
            if result.accepted:
                S.flash("success", f"Added {len(result.accepted)} image(s) to the forget set.")
            st.session_state.fs_up_rev = st.session_state.get("fs_up_rev", 0) + 1  # empties the uploader
            st.rerun()
        S.show_flash()
        ups = S.uploads()
        if ups:
            st.markdown(f"**{len(ups)} uploaded image(s) in the forget set**")
            grid = st.columns(COLS)
            for i, up in enumerate(ups):
                with grid[i % COLS]:
                    st.image(R.upload_png(up.pixels), caption=f"{up.name[:14]} · {classes[up.label]}",
                             width=R.THUMB_PX)
                    if st.button("remove", key=f"up_rm_{i}"):
                        ups.pop(i)
                        st.rerun()

    with tab_io:
        payload = {"dataset": ds.name, "split": "train", "ids": sorted(sel)}
        st.download_button("Download the selection (JSON id list)", json.dumps(payload, indent=1),
                           file_name="forget_set.json", mime="application/json", disabled=not sel)
        if S.uploads():
            st.caption("Uploaded images are not part of the id list.")
        loaded = st.file_uploader("Load an id list (.json with an `ids` list, or .txt with one id per line)",
                                  type=["json", "txt"], key=f"fs_ids_{st.session_state.get('fs_ids_rev', 0)}")
        if loaded is not None and st.button("Load this id list"):
            try:
                ids = parse_forget_ids(loaded.getvalue(), "the file", dataset=ds.name)
                ds.train.positions(ids)  # raises DataError on ids not in this split
            except Exception as exc:
                st.error(f"Could not load {loaded.name}: {exc}")
            else:
                S.set_selection(ids)
                st.session_state.fs_ids_rev = st.session_state.get("fs_ids_rev", 0) + 1
                st.success(f"Loaded {len(ids)} ids.")
                st.rerun()
