"""Audit: metrics before/after, per-class accuracy, drift + timeline, affinity, Grad-CAM, MIA, downloads.

The numbers and arrays come from core.audit.views (the same views as the HTML report); this page only draws.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core import figures as F
from core import runs as core_runs
from core.audit import views
from core.audit.gradcam import overlay
from core.audit.mia import MIA_DEFINITION, mia_before_after
from dashboard import resources as R
from dashboard import session as S
from dashboard import widgets

st.title("Audit")
if msg := st.session_state.pop("audit_download_error", None):  # set by a download's on_click (below)
    st.error(msg, icon=":material/error:")
root = core_runs.runs_root()
listed = core_runs.visible_runs(root, S.owner_secret(), S.grants())  # this session's, the CLI's, shared ones
complete = [r for r in listed if r.ok]
cur = S.current_run()
ids = [r.run_id for r in complete]
lost = cur is not None and cur.name not in ids  # the run this session was looking at is gone or damaged
if lost:
    damaged = {r.run_id: r.error for r in listed if not r.ok}
    why = (f"is damaged ({core_runs.redact_paths(damaged[cur.name])})" if cur.name in damaged else
           "is no longer shared with this session" if (root / cur.name).is_dir() else
           "was deleted (on the Runs page, by its session or outside the dashboard)")
    st.error(f"Run `{cur.name}`, shown here before, {why}; its pictures and files are no longer available. "
             + ("Choose another run below." if ids else ""), icon=":material/error:")
if not complete:
    if not lost:
        st.info("No complete run yet. Start one on the Unlearn page.")
    st.stop()

idx = None if lost else (ids.index(cur.name) if cur is not None else 0)
choice = st.selectbox("Run", ids, index=idx, key=f"audit_run_{cur.name if cur else ''}",
                      placeholder="Choose a run", help="This session's runs, the command line's and runs shared "
                                                       "with this session; the caption says which.")
if choice is None:  # never switch to another run on the user's behalf
    st.stop()
run_dir = root / choice
S.set_current_run(run_dir)
try:
    rec = R.load_run(run_dir)
    problem = core_runs.meta_problem(rec.meta)
except (core_runs.RunError, OSError) as exc:  # deleted or damaged after the listing above
    problem = core_runs.redact_paths(str(exc))
if problem:
    st.error(f"Run `{choice}` cannot be shown: {problem}. It may have been deleted or damaged just now; "
             "reload the page to see the runs that remain.", icon=":material/error:")
    st.stop()
meta, audit = rec.meta, rec.audit
for m in rec.missing:
    st.warning(f"This run is incomplete: {core_runs.redact_paths(m)}")
classes = R.class_names(meta)
labels, groups = audit.get("labels"), audit.get("group")
groups = groups.astype(str) if groups is not None else None

# ---------------------------------------------------------------- header + metrics
cfg = meta.get("config", {})
k = meta.get("k", len(meta.get("forget_ids", [])))
info = complete[ids.index(choice)]
origin = f"origin: {info.origin_label}" + ("" if info.own else " (read-only)")
parts = [f"**{meta.get('method')}**", origin, f"k={k}", f"seed {meta.get('seed')}",
         f"stopped: {meta.get('stop_reason')} after {meta.get('steps')} steps",
         *filter(None, [views.returned_step(meta)]),
         f"encoder `{(meta.get('anchors') or {}).get('encoder')}`", str(meta.get("device")),
         f"{(meta.get('timings') or {}).get('total', 0):.0f} s"]
if meta.get("parent_run"):
    parts.append(f"continues `{meta['parent_run']}`")
if meta.get("method") == "structguard":
    parts.append(f"ablations SA={cfg.get('sa')} SR={cfg.get('sr')} CR={cfg.get('cr')}")
st.caption(" · ".join(parts))
before, after = meta["metrics"]["before"], meta["metrics"]["after"]
acc = {r["key"]: r for r in views.accuracy_rows(meta)}
cards = [("forget_acc", "Forget accuracy", "inverse"), ("retain_acc", f"Retain accuracy ({after.get('retain_set')})",
                                                        "normal"),
         ("test_acc", "Test accuracy", "normal"), ("dim_alignment", "Dimensional alignment", "off")]
for col, (key, label, color) in zip(st.columns(4), cards, strict=True):
    row = acc[key]
    if row["after"] is None:
        continue
    unit = "%" if key.endswith("acc") else ""
    col.metric(label, f"{row['after']:.2f}{unit}",
               None if row["delta"] is None else f"{row['delta']:+.2f}{unit} (before {row['before']:.2f})",
               delta_color=color)
reference = meta["metrics"].get("retrain")
if reference:
    cols = st.columns(4)
    for col, key, label in zip(cols, ("forget_acc", "retain_acc", "test_acc"),
                               ("Forget accuracy", "Retain accuracy", "Test accuracy"), strict=False):
        row = acc[key]
        if row["retrain"] is None:
            continue
        col.metric(f"Retrained: {label.lower()}", f"{row['retrain']:.2f}%",
                   None if row["gap"] is None else f"{row['gap']:+.2f} (unlearned − retrained)", delta_color="off",
                   help="The base model's recipe trained from scratch without the forget set: the reference.")
    cols[3].metric("Tug-of-War vs retrain", f"{reference['tug_of_war']:.3f}",
                   help=views.TOW_DEFINITION)
    st.caption(f"Retrain reference `{reference.get('card')}` (made by `{reference.get('command')}`).")
else:
    st.caption("No retrained reference for this forget set (`python -m core retrain --ids FILE` makes one).")
structure = after.get("structure") or {}
if structure:
    cols = st.columns(len(structure))
    for col, (k, v) in zip(cols, structure.items(), strict=True):
        col.metric(f"Structure: {k.replace('_', ' ')}", f"{v:.3f}", help="1 = unchanged by unlearning")

c1, c2, c3, c4 = st.columns(4)
if info.own and info.ok:
    with c4:
        widgets.share_panel(info)


@st.cache_data(show_spinner="Building the HTML report ...", max_entries=8)
def _report(path: str, mtime: float) -> bytes:
    """The report, written to a temporary folder (the run folder may be read-only) and read back."""
    import tempfile

    from core.report import build_report

    with tempfile.TemporaryDirectory(prefix="structguard-report-") as tmp:
        res = build_report(path, Path(tmp) / "report.html", drift_method=views.drift_method())
        return Path(res.path).read_bytes()


def _gone(run_id: str, name: str) -> str:
    return (f"Run `{run_id}` was deleted while it was shown (on the Runs page, by another session or outside the "
            f"dashboard): the {name} could not be downloaded.")


def _check_download(path: Path, name: str) -> None:
    """on_click of a download: runs before the rerun the click causes; a file gone by then is said so
    (the deferred read itself fails without a word in the browser)."""
    if not path.is_file():
        st.session_state["audit_download_error"] = _gone(path.parent.name, name)


try:
    mtime = (run_dir / "run.json").stat().st_mtime
except OSError:
    st.error(_gone(choice, "run"), icon=":material/error:")
    st.stop()
if c1.button("Prepare HTML report", icon=":material/description:"):
    st.session_state[f"report_{choice}"] = True
if st.session_state.get(f"report_{choice}"):
    try:
        report = _report(str(run_dir), mtime)
    except (core_runs.RunError, OSError) as exc:  # full disk (StorageError) or the run deleted meanwhile
        c1.error(f"The report could not be built: {core_runs.redact_paths(str(exc))}", icon=":material/error:")
    else:
        c1.download_button("Download HTML report", report, file_name=f"{choice}-report.html",
                           mime="text/html", icon=":material/download:", type="primary")
# Deferred downloads: the files are read only when the button is clicked.
weights, record = run_dir / "model.safetensors", run_dir / "run.json"
c2.download_button("Download weights (safetensors)", weights.read_bytes, file_name=f"{choice}.safetensors",
                   icon=":material/download:", on_click=_check_download, args=(weights, "weights"))
c3.download_button("Download run record (run.json)", record.read_bytes, file_name=f"{choice}-run.json",
                   mime="application/json", icon=":material/download:", on_click=_check_download,
                   args=(record, "run record"))

# ---------------------------------------------------------------- sections (only the chosen one is computed)
SECTIONS = ["Accuracy", "Drift", "Affinity", "Grad-CAM", "Membership inference", "Record"]
S.widget_defaults(audit_section="Accuracy")
section = st.segmented_control("Section", SECTIONS, key="audit_section", required=True,
                               label_visibility="collapsed")

if section == "Accuracy":
    st.plotly_chart(F.per_class_accuracy_bars(before["per_class_test_acc"], after["per_class_test_acc"], classes),
                    key="au_pc")
    st.plotly_chart(F.history_curves(meta.get("history") or [], polish=views.polish_record(meta)), key="au_hist")

elif section == "Drift":
    if labels is None or "feats_before" not in audit:
        st.warning("This run has no audit features; drift cannot be drawn.")
    else:
        view = R.drift_view(run_dir)
        drift = view.result
        s = drift.summary()
        st.caption(f"{drift.method.upper()} map fitted on the original model's prediction-path features"
                   + (f" ({drift.note})" if drift.note else "") + f". Median displacement (class radii): forget "
                   f"{s['forget']['median']:.2f}, retain {s['retain']['median']:.2f}, test {s['test']['median']:.2f}.")
        st.plotly_chart(F.drift_scatter(drift.before, drift.after, labels, groups, classes, method=drift.method),
                        key="au_drift")
        st.plotly_chart(F.drift_class_bars(drift.per_class, classes, forget_median=s["forget"]["median"]),
                        key="au_drift_bars")
        if view.frames is not None:
            st.plotly_chart(F.drift_timeline(view.frames, view.steps, labels, groups, classes,
                                             before_xy=view.before_xy, frame_notes=view.frame_notes),
                            key="au_timeline")
        else:
            st.caption("This run stored no feature snapshots, so there is no timeline.")

elif section == "Affinity":
    try:
        view = R.affinity_view(run_dir)
    except KeyError:
        st.warning("This run has no affinity arrays (nor the features and anchors to recompute them).")
    else:
        if view.recomputed:
            st.caption("This run stored no affinities; they are recomputed from its features and anchors.")
        st.plotly_chart(F.anchor_similarity_heatmap(view.anchor_similarity, classes), key="au_anc")
        st.plotly_chart(F.affinity_heatmaps(view.s_ori, view.s_unl, labels, groups, classes), key="au_aff")
        st.plotly_chart(F.class_mean_heatmaps(view.class_mean_before, view.class_mean_after, classes), key="au_cm")
        st.caption("Class means use the retained and test samples only: the forget rows are meant to move.")
        st.plotly_chart(F.row_cosine_histogram(view.row_cosine, groups), key="au_rowcos")

elif section == "Grad-CAM":
    n = st.slider("Forget images shown", 1, 8, 4, key="au_gc_n")
    try:
        view = R.gradcam_view(run_dir, int(n))
    except Exception as exc:  # missing parent run, unreadable model or dataset, ...
        st.error(f"Grad-CAM unavailable: {core_runs.redact_paths(str(exc))}")
    else:
        for warning in view.warnings:
            st.warning(f"Warning: {warning}.")
        for note in view.notes:
            st.caption(f"Note: {note}.")
        caps = [f"{'forget' if j < view.n_forget else 'kept'} #{int(i)}" for j, i in enumerate(view.ids)]
        sub_b, sub_a = ([f"pred {classes[p] if p < len(classes) else p} · p={q:.2f}" for p, q in zip(pred, prob,
                                                                                                     strict=True)]
                        for pred, prob in ((view.pred_before, view.prob_before), (view.pred_after, view.prob_after)))
        st.plotly_chart(F.gradcam_gallery(view.images, overlay(view.images, view.cams_before),
                                          overlay(view.images, view.cams_after), caps, sub_before=sub_b,
                                          sub_after=sub_a), key="au_gradcam")
        st.caption(f"Maps for the true label; 'before' is the {view.before_source}.")

elif section == "Membership inference":
    res = mia_before_after(audit)
    if not res:
        st.warning("This run lacks the confidence arrays the attack needs.")
    else:
        b, a = res.get("before"), res.get("after")
        st.plotly_chart(F.mia_figure(b.as_dict() if b else None, a.as_dict() if a else None), key="au_mia")
        if caption := views.forget_auc_caption(res, meta):
            st.caption(caption)
        st.dataframe({k: v.as_dict() for k, v in res.items()})
        with st.expander("How the attack works"):
            st.markdown(MIA_DEFINITION)

else:
    st.json({k: meta.get(k) for k in ("run_id", "created", "method", "config", "seed", "parent_run", "model",
                                      "dataset", "anchors", "timings", "peak_rss_mb", "code_version",
                                      "environment", "stop_reason")}, expanded=False)
    st.markdown(f"**Forget ids** ({len(meta.get('forget_ids', []))}): "
                + ", ".join(map(str, meta.get("forget_ids", [])[:200])))
