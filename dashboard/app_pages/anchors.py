"""Anchors: edit each class's attributes, choose the encoder, watch the anchor similarities change."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from core.anchors import AnchorError, build_anchor_set, load_anchor_texts, validate_anchor_texts
from core.audit.affinity import anchor_similarity
from core.figures import anchor_similarity_heatmap
from dashboard import resources as R
from dashboard import session as S

st.title("Anchors")
st.caption("Each class's visual attributes are joined into one description (\"a1; a2; ...\") and encoded into a "
           "text embedding: the class's semantic anchor. StructGuard keeps the proxy samples' affinities to these "
           "anchors as they were before unlearning.")

ds = R.get_dataset()
classes = ds.class_names


@st.cache_data(show_spinner=False)
def _defaults(dataset: str, class_names: tuple[str, ...]) -> dict[str, list[str]]:
    return load_anchor_texts(dataset, list(class_names))


try:
    defaults = _defaults(ds.name, tuple(classes))
except AnchorError as exc:
    st.error(f"The default anchors could not be loaded: {exc}")
    defaults = {c: [c] for c in classes}

texts = S.anchor_texts(defaults)
rev = S.anchor_rev()


def _edit(cls: str, key: str) -> None:
    lines = [ln.strip() for ln in st.session_state[key].splitlines()]
    texts[cls] = [ln for ln in lines if ln]
    st.session_state.anchors_edited = texts != defaults


# ---------------------------------------------------------------- encoder
choices = dict(R.encoder_choices())
choices.setdefault(S.encoder_choice(), "available: chosen by STRUCTGUARD_ENCODER")
names = list(choices)
S.widget_defaults(anc_live=True)
c1, c2, c3 = st.columns([2, 1, 1])
enc_name = c1.selectbox("Text encoder", names, index=names.index(S.encoder_choice())
                        if S.encoder_choice() in names else 0,
                        format_func=lambda n: f"{n} — {choices[n].split(':')[0]}", key=f"anc_enc_{rev}",
                        help="\n\n".join(f"**{n}**: {d}" for n, d in choices.items()))
st.session_state.encoder = enc_name
live = c2.toggle("Live update", key="anc_live", help="Re-encode whenever a description changes.")
reencode = c3.button("Re-encode now", icon=":material/refresh:", disabled=live)
if choices.get(enc_name, "").startswith("unavailable"):
    st.warning(f"`{enc_name}` is {choices[enc_name]}")

# ---------------------------------------------------------------- editors
left, right = st.columns([3, 2])
with left:
    st.subheader("Attributes per class")
    st.caption("One attribute per line. Changes apply to this session's next runs.")
    cols = st.columns(2)
    for i, cls in enumerate(classes):
        key = f"anc_{rev}_{i}"
        with cols[i % 2]:
            changed = texts.get(cls) != defaults.get(cls)
            st.text_area(f"{cls}{' (edited)' if changed else ''}", "\n".join(texts.get(cls, [])), key=key,
                         height=150, on_change=_edit, args=(cls, key))
    b1, b2, b3 = st.columns(3)
    if b1.button("Restore defaults", icon=":material/restart_alt:", disabled=texts == defaults):
        S.set_anchor_texts(defaults)
        st.session_state.anchors_edited = False
        st.rerun()
    b2.download_button("Export JSON", json.dumps({"dataset": ds.name, "classes": texts}, indent=2, ensure_ascii=False),
                       file_name=f"anchors-{ds.name}.json", mime="application/json", icon=":material/download:")
    with b3.popover("Import JSON", icon=":material/upload:"):
        up = st.file_uploader("Anchor file", type=["json"], key=f"anc_import_{rev}")
        if up is not None and st.button("Use this file"):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "anchors.json"
                path.write_bytes(up.getvalue())
                try:
                    meta = json.loads(up.getvalue().decode("utf-8"))
                    if isinstance(meta, dict) and meta.get("dataset") not in (None, ds.name):
                        raise AnchorError(f"the file is for dataset {meta.get('dataset')!r}, not {ds.name!r}")
                    loaded = load_anchor_texts(path, classes)
                except (AnchorError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                    st.error(f"{up.name} does not fit {ds.name}: {exc}")
                else:
                    S.set_anchor_texts(loaded)
                    st.session_state.anchors_edited = loaded != defaults
                    st.rerun()

# ---------------------------------------------------------------- encode + heatmap
with right:
    st.subheader("Anchor similarity")
    anchor_set, problem = st.session_state.get("anchor_set"), None
    wanted = (json.dumps(texts, sort_keys=True), enc_name)
    if live or reencode or anchor_set is None:
        try:
            validate_anchor_texts(texts, classes)
            with st.spinner(f"Encoding with {enc_name} ..."):
                anchor_set = build_anchor_set(texts, classes, R.get_encoder(enc_name), ds.name)
            st.session_state.anchor_set, st.session_state.anchor_set_key = anchor_set, wanted
        except Exception as exc:  # AnchorError (bad text) or EncoderError (missing weights)
            problem = str(exc)
    if problem:
        st.error(problem)
    if anchor_set is not None:
        stale = st.session_state.get("anchor_set_key") != wanted
        st.caption(f"Encoder in use: **{anchor_set.encoder}** · {anchor_set.matrix.shape[1]}-d · "
                   f"hash `{anchor_set.hash[:12]}`" + (" · **stale: press Re-encode**" if stale else ""))
        sim = anchor_similarity(anchor_set.matrix.numpy())
        st.plotly_chart(anchor_similarity_heatmap(sim, anchor_set.class_names, title="Cosine between class anchors"),
                        key="anc_heat")
        for w in anchor_set.warnings:
            st.warning(w, icon=":material/warning:")

    st.subheader("Difference from the defaults")
    rows = []
    for cls in classes:
        cur, base = texts.get(cls, []), defaults.get(cls, [])
        added = [a for a in cur if a not in base]
        removed = [a for a in base if a not in cur]
        if added or removed:
            rows.append({"class": cls, "added": "; ".join(added), "removed": "; ".join(removed)})
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    else:
        st.caption("No changes: the default descriptions are in use.")
