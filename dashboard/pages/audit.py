"""Audit: metrics before/after, per-class accuracy, drift + timeline, affinity, Grad-CAM, MIA, downloads."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from core import figures as F
from core import runs as core_runs
from core.audit import affinity as aff
from core.audit.mia import MIA_DEFINITION, mia_before_after
from dashboard import state

st.title("Audit")
root = state.runs_root()
complete = [r for r in core_runs.list_runs(root) if r.ok]
if not complete:
    st.info("No complete run yet. Start one on the Unlearn page.")
    st.stop()

ids = [r.run_id for r in complete]
cur = state.current_run()
idx = ids.index(cur.name) if cur is not None and cur.name in ids else 0
choice = st.selectbox("Run", ids, index=idx, key=f"audit_run_{cur.name if cur else ''}",
                      help="★ in the caption marks runs made in this session.")
run_dir = root / choice
state.set_current_run(run_dir)
rec = state.load_run(run_dir)
meta, audit = rec.meta, rec.audit
for m in rec.missing:
    st.warning(f"This run is incomplete: {m}")
classes = list((meta.get("anchors") or {}).get("class_names") or (meta.get("dataset") or {}).get("classes") or [])
labels, groups = audit.get("labels"), audit.get("group")
groups = groups.astype(str) if groups is not None else None

# ---------------------------------------------------------------- header + metrics
cfg = meta.get("config", {})
k = meta.get("k", len(meta.get("forget_ids", [])))
star = "★ " if choice in state.my_runs() else ""
parts = [f"{star}**{meta.get('method')}**", f"k={k}", f"seed {meta.get('seed')}",
         f"stopped: {meta.get('stop_reason')} after {meta.get('steps')} steps",
         f"encoder `{(meta.get('anchors') or {}).get('encoder')}`", str(meta.get("device")),
         f"{(meta.get('timings') or {}).get('total', 0):.0f} s"]
if meta.get("parent_run"):
    parts.append(f"continues `{meta['parent_run']}`")
if meta.get("method") == "structguard":
    parts.append(f"ablations SA={cfg.get('sa')} SR={cfg.get('sr')} CR={cfg.get('cr')}")
st.caption(" · ".join(parts))
before, after = meta["metrics"]["before"], meta["metrics"]["after"]
cols = st.columns(4)
for col, (key, label, good) in zip(cols, [("forget_acc", "Forget accuracy", "inverse"),
                                          ("retain_acc", f"Retain accuracy ({after.get('retain_set')})", "normal"),
                                          ("test_acc", "Test accuracy", "normal"),
                                          ("dim_alignment", "Dimensional alignment", "off")]):
    b, a = before.get(key), after.get(key)
    if a is None:
        continue
    unit = "%" if key.endswith("acc") else ""
    col.metric(label, f"{a:.2f}{unit}", None if b is None else f"{a - b:+.2f}{unit} (before {b:.2f})",
               delta_color=good)
reference = meta["metrics"].get("retrain")
if reference:
    cols = st.columns(4)
    for col, key, label in zip(cols, ("forget_acc", "retain_acc", "test_acc"),
                               ("Forget accuracy", "Retain accuracy", "Test accuracy")):
        col.metric(f"Retrained: {label.lower()}", f"{reference[key]:.2f}%",
                   f"{after[key] - reference[key]:+.2f} (unlearned − retrained)", delta_color="off",
                   help="The base model's recipe trained from scratch without the forget set: the reference.")
    cols[3].metric("Tug-of-War vs retrain", f"{reference['tug_of_war']:.3f}",
                   help="Product over A_f, A_r, A_test of (1 - |unlearned - retrained| / 100); 1 = the retrained "
                        "model.")
    st.caption(f"Retrain reference `{reference.get('card')}` (made by `{reference.get('command')}`).")
else:
    st.caption("No retrained reference for this forget set (`python -m core retrain --ids FILE` makes one).")
structure = after.get("structure") or {}
if structure:
    cols = st.columns(len(structure))
    for col, (k, v) in zip(cols, structure.items()):
        col.metric(f"Structure: {k.replace('_', ' ')}", f"{v:.3f}", help="1 = unchanged by unlearning")

c1, c2, c3 = st.columns(3)


@st.cache_data(show_spinner="Building the HTML report ...", max_entries=8)
def _report(path: str, mtime: float) -> bytes:
    from core.report import build_report

    res = build_report(path, drift_method=os.environ.get("STRUCTGUARD_DRIFT_METHOD", "auto"))
    return Path(res.path).read_bytes()


mtime = (run_dir / "run.json").stat().st_mtime
if c1.button("Prepare HTML report", icon=":material/description:"):
    st.session_state[f"report_{choice}"] = True
if st.session_state.get(f"report_{choice}"):
    c1.download_button("Download HTML report", _report(str(run_dir), mtime), file_name=f"{choice}-report.html",
                       mime="text/html", icon=":material/download:", type="primary")
# Deferred downloads: the files are read only when the button is clicked.
c2.download_button("Download weights (safetensors)", (run_dir / "model.safetensors").read_bytes,
                   file_name=f"{choice}.safetensors", icon=":material/download:")
c3.download_button("Download run record (run.json)", (run_dir / "run.json").read_bytes,
                   file_name=f"{choice}-run.json", mime="application/json", icon=":material/download:")

# ---------------------------------------------------------------- sections (only the chosen one is computed)
SECTIONS = ["Accuracy", "Drift", "Affinity", "Grad-CAM", "Membership inference", "Record"]
state.widget_defaults(audit_section="Accuracy")
section = st.segmented_control("Section", SECTIONS, key="audit_section", required=True,
                               label_visibility="collapsed")

if section == "Accuracy":
    st.plotly_chart(F.per_class_accuracy_bars(before["per_class_test_acc"], after["per_class_test_acc"], classes),
                    key="au_pc")
    st.plotly_chart(F.history_curves(meta.get("history") or []), key="au_hist")

elif section == "Drift":
    if labels is None or "feats_before" not in audit:
        st.warning("This run has no audit features; drift cannot be drawn.")
    else:
        drift, frames = state.drift(str(run_dir), mtime)
        s = drift.summary()
        st.caption(f"{drift.method.upper()} map fitted on the original features"
                   + (f" ({drift.note})" if drift.note else "") + f". Median displacement (class radii): forget "
                   f"{s['forget']['median']:.2f}, retain {s['retain']['median']:.2f}, test {s['test']['median']:.2f}.")
        st.plotly_chart(F.drift_scatter(drift.before, drift.after, labels, groups, classes, method=drift.method),
                        key="au_drift")
        st.plotly_chart(F.drift_class_bars(drift.per_class, classes, forget_median=s["forget"]["median"]),
                        key="au_drift_bars")
        if frames is not None:
            steps = [int(x) for x in audit["snapshot_steps"]]
            hist = {int(h["step"]): h.get("forget_acc") for h in meta.get("history") or []}
            notes = [f"forget accuracy {hist[x]:.0f}%" if isinstance(hist.get(x), (int, float)) else "" for x in steps]
            st.plotly_chart(F.drift_timeline(frames, steps, labels, groups, classes,
                                             before_xy=None if steps[0] == 0 else drift.before, frame_notes=notes),
                            key="au_timeline")
        else:
            st.caption("This run stored no feature snapshots, so there is no timeline.")

elif section == "Affinity":
    if "affinity_before" not in audit:
        st.warning("This run has no affinity arrays.")
    else:
        s_ori, s_unl = audit["affinity_before"], audit["affinity_after"]
        st.plotly_chart(F.anchor_similarity_heatmap(aff.anchor_similarity(audit["anchors"]), classes), key="au_anc")
        st.plotly_chart(F.affinity_heatmaps(s_ori, s_unl, labels, groups, classes), key="au_aff")
        n = len(classes)
        st.plotly_chart(F.class_mean_heatmaps(aff.class_mean_affinity(s_ori, labels, n),
                                              aff.class_mean_affinity(s_unl, labels, n), classes), key="au_cm")
        st.plotly_chart(F.row_cosine_histogram(aff.row_cosine(s_ori, s_unl), groups), key="au_rowcos")

elif section == "Grad-CAM":
    n = st.slider("Forget images shown", 1, 8, 4, key="au_gc_n")
    try:
        gallery = state.gradcam(str(run_dir), mtime, int(n))
    except Exception as exc:  # missing parent run, changed base model, ...
        st.error(f"Grad-CAM unavailable: {exc}")
    else:
        st.plotly_chart(gallery, key="au_gradcam")

elif section == "Membership inference":
    res = mia_before_after(audit)
    if not res:
        st.warning("This run lacks the confidence arrays the attack needs.")
    else:
        b, a = res.get("before"), res.get("after")
        st.plotly_chart(F.mia_figure(b.as_dict() if b else None, a.as_dict() if a else None), key="au_mia")
        st.dataframe({k: v.as_dict() for k, v in res.items()})
        with st.expander("How the attack works"):
            st.markdown(MIA_DEFINITION)

else:
    st.json({k: meta.get(k) for k in ("run_id", "created", "method", "config", "seed", "parent_run", "model",
                                      "dataset", "anchors", "timings", "peak_rss_mb", "code_version",
                                      "environment", "stop_reason")}, expanded=False)
    st.markdown(f"**Forget ids** ({len(meta.get('forget_ids', []))}): "
                + ", ".join(map(str, meta.get("forget_ids", [])[:200])))
