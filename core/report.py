"""Self-contained HTML audit report of one run directory (plotly inline, images embedded, opens offline).

Every section is computed on its own: a damaged, older or unusual run (no snapshots,
a forget set of one image, classes absent from the audit sample) still yields a
report of what can be shown, and a list of what is missing and why.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from . import figures as F
from .audit import affinity as aff
from .audit.drift import embedding_drift, project_snapshots
from .audit.mia import MIA_DEFINITION, mia_before_after

__all__ = ["ReportResult", "build_report", "export_pngs", "find_chromium", "load_run_tolerant"]

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


@dataclass
class ReportResult:
    path: Path
    missing: list[str]
    figures: list[str]
    pngs: list[Path] = field(default_factory=list)
    png_note: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ loading


def load_run_tolerant(run_dir: str | Path) -> tuple[dict, dict[str, np.ndarray], list[str]]:
    """(run.json dict, audit arrays, problems). Never raises for a damaged run: reads what it can."""
    path = Path(run_dir)
    problems: list[str] = []
    meta: dict = {}
    audit: dict[str, np.ndarray] = {}
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    try:
        from .runs import load_run

        rec = load_run(path)
        meta, audit = rec.meta, rec.audit
        problems.extend(rec.missing)
    except Exception as exc:  # RunError (no/damaged run.json) or an older core without runs.py
        problems.append(str(exc))
        try:
            meta = json.loads((path / "run.json").read_text())
        except Exception:
            meta = {}
    if not isinstance(meta, dict):
        problems.append("run.json does not hold an object")
        meta = {}
    if not audit and (path / "audit.npz").is_file():
        # a damaged archive may still have readable members: take them one by one
        try:
            with np.load(path / "audit.npz", allow_pickle=False) as z:
                for k in z.files:
                    try:
                        audit[k] = z[k]
                    except Exception as exc:
                        problems.append(f"audit.npz member {k!r} unreadable ({type(exc).__name__})")
        except Exception as exc:
            problems.append(f"audit.npz cannot be opened ({type(exc).__name__}: {exc})")
    problems = [p for i, p in enumerate(problems) if p not in problems[:i]]
    return meta, audit, problems


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


# ------------------------------------------------------------------------------------------- report


class _Report:
    """Collects HTML pieces, figures and the list of what is missing."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.missing: list[str] = []
        self.figs: dict[str, go.Figure] = {}
        self.seconds: dict[str, float] = {}

    def section(self, anchor: str, title: str, intro: str = "") -> None:
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')
        if intro:
            self.parts.append(f'<p class="intro">{intro}</p>')

    def note_missing(self, what: str) -> None:
        self.missing.append(what)
        self.parts.append(f'<div class="missing">Not shown: {html.escape(what)}</div>')

    def text(self, s: str) -> None:
        self.parts.append(s)

    def figure(self, name: str, fig: go.Figure) -> None:
        self.figs[name] = fig
        div = pio.to_html(fig, full_html=False, include_plotlyjs=False, auto_play=False, div_id=f"fig-{name}",
                          config={"displaylogo": False, "responsive": True})
        self.parts.append(f'<div class="fig" data-figure="{name}">{div}</div>')

    def run(self, label: str, fn: Callable[[], None]) -> None:
        """Run one section; an unexpected failure becomes a 'missing' note instead of killing the report."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:
            self.note_missing(f"{label}: failed with {type(exc).__name__}: {exc}")
            if os.environ.get("STRUCTGUARD_DEBUG"):
                traceback.print_exc()
        self.seconds[label] = time.perf_counter() - t0


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{nd}f}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _fmt(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """Marks table cells that are already HTML."""


def _delta(before: Any, after: Any, nd: int = 2, good: str = "up") -> _Raw:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return _Raw("—")
    d = after - before
    cls = "neutral" if abs(d) < 10 ** -nd else ("good" if (d > 0) == (good == "up") else "bad")
    return _Raw(f'<span class="{cls}">{d:+.{nd}f}</span>')


def build_report(run_dir: str | Path, out: str | Path | None = None, *, png_dir: str | Path | None = None,
                 drift_method: str = "auto", drift_space: str = "prediction", gradcam: bool = True,
                 n_gradcam: int = 4, device: str | None = None,
                 progress: Callable[[str], None] | None = None) -> ReportResult:
    """Write the HTML audit report of `run_dir` (default: `<run_dir>/report.html`) and optional PNGs."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    say = progress or (lambda s: None)
    meta, audit, problems = load_run_tolerant(run_dir)
    rep = _Report()
    rep.missing.extend(problems)
    class_names = list(_get(meta, "anchors", "class_names") or _get(meta, "dataset", "classes") or [])
    n_classes = len(class_names) or int(audit["labels"].max() + 1 if "labels" in audit and audit["labels"].size else 0)
    class_names = F._names(class_names, n_classes)
    groups = audit["group"].astype(str) if "group" in audit else None
    labels = audit["labels"].astype(np.int64) if "labels" in audit else None

    say("metrics")
    rep.run("metrics", lambda: _metrics_section(rep, meta, class_names))
    say("history")
    rep.run("history", lambda: _history_section(rep, meta))
    say("embedding drift")
    rep.run("drift", lambda: _drift_section(rep, meta, audit, labels, groups, class_names, drift_method, drift_space))
    say("affinity")
    rep.run("affinity", lambda: _affinity_section(rep, audit, labels, groups, class_names))
    if gradcam:
        say("grad-cam")
        rep.run("Grad-CAM", lambda: _gradcam_section(rep, run_dir, meta, audit, class_names, n_gradcam, device))
    say("membership inference")
    rep.run("membership inference", lambda: _mia_section(rep, audit))
    rep.run("provenance", lambda: _provenance_section(rep, meta, run_dir))

    absent = _absent_classes(labels, groups, n_classes, class_names)
    doc = _page(meta, run_dir, rep, absent)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".part")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(out)
    result = ReportResult(out, rep.missing, list(rep.figs), seconds=rep.seconds)
    if png_dir is not None:
        say("png export")
        t0 = time.perf_counter()
        result.pngs, result.png_note = export_pngs(rep.figs, png_dir)
        result.seconds["png export"] = time.perf_counter() - t0
    return result


def _absent_classes(labels: np.ndarray | None, groups: np.ndarray | None, n_classes: int,
                    class_names: list[str]) -> list[str]:
    if labels is None or groups is None:
        return []
    kept = labels[groups != "forget"]
    return [class_names[c] for c in range(n_classes) if not (kept == c).any()]


# ----------------------------------------------------------------------------------------- sections


METRIC_ROWS = [
    ("forget_acc", "Forget accuracy A_f (%)", "down"),
    ("retain_acc", "Retain accuracy A_r (%)", "up"),
    ("test_acc", "Test accuracy A_test (%)", "up"),
    ("dim_alignment", "Dimensional alignment of forget features", "down"),
]


def _metrics_section(rep: _Report, meta: dict, class_names: list[str]) -> None:
    rep.section("metrics", "Metrics before and after",
                "Accuracies in percent. Green deltas move the way unlearning should (forget accuracy down, "
                "retained and test accuracy up or unchanged).")
    before, after = _get(meta, "metrics", "before"), _get(meta, "metrics", "after")
    if not isinstance(before, dict) or not isinstance(after, dict):
        rep.note_missing("metrics (run.json has no metrics.before / metrics.after)")
        return
    ref = _get(meta, "metrics", "retrain")
    ref = ref if isinstance(ref, dict) else None  # the retrained model: what unlearning is measured against
    rows = []
    for key, label, good in METRIC_ROWS:
        b, a = before.get(key), after.get(key)
        nd = 3 if key == "dim_alignment" else 2
        row = [label, _fmt(b, nd), _fmt(a, nd), _delta(b, a, nd, good)]
        if ref is not None:
            r = ref.get(key)
            row += [_fmt(r), _fmt(a - r)] if isinstance(r, (int, float)) and isinstance(a, (int, float)) \
                else [_Raw(""), _Raw("")]
        rows.append(row)
    fa = after.get("forget_acc")
    if isinstance(fa, (int, float)):
        success = ["Forget success 100 - A_f (%)", _fmt(100 - before.get("forget_acc", np.nan)), _fmt(100 - fa),
                   _Raw("")]
        if ref is not None:
            success += [_fmt(100 - ref.get("forget_acc", np.nan)), _Raw("")]
        rows.insert(1, success)
    header = ["metric", "original", "unlearned", "Δ"] + (["retrained", "unlearned − retrained"] if ref else [])
    rep.text(_table(header, rows, "metrics"))
    if ref is not None:
        mia = ref.get("mia_forget_member_rate") or {}
        rep.text(f"<p>Retrain reference: the base model's recipe trained from scratch without the forget set "
                 f"(<code>{html.escape(str(ref.get('card')))}</code>, made by "
                 f"<code>{html.escape(str(ref.get('command')))}</code>). Tug-of-War score "
                 f"{_fmt(ref.get('tug_of_war'), 3)} (1 = the retrained model's accuracies). Forget samples called "
                 f"members by the confidence attack: unlearned {_fmt(mia.get('unlearned'), 3)}, retrained "
                 f"{_fmt(mia.get('retrain'), 3)}.</p>")
    extra = [f"Retain accuracy measured on: {html.escape(str(after.get('retain_set', 'unknown')))}."]
    if "dim_alignment_energy" in after:
        extra.append(f"Dimensional alignment: share of the forget features' energy inside the top eigenspace "
                     f"holding {after['dim_alignment_energy']:.0%} of the retained features' energy.")
    rep.text("<p>" + " ".join(extra) + "</p>")
    srows = []
    for key, label in (("structure", "prediction path"), ("structure_backbone", "backbone h(x)")):
        s = after.get(key)
        if isinstance(s, dict):
            srows.append([label, s.get("affinity_cosine"), s.get("cka"), s.get("knn_overlap")])
    if srows:
        rep.text("<h3>Structure preservation on retained and test samples (1 = unchanged)</h3>"
                 + _table(["features", "affinity row cosine", "linear CKA", "kNN overlap (k=10)"],
                          [[r[0]] + [_fmt(v, 3) for v in r[1:]] for r in srows]))
    else:
        rep.note_missing("structure scores (metrics.after.structure)")
    run_rows = [["stop reason", meta.get("stop_reason")], ["update steps", meta.get("steps")],
                ["device", meta.get("device")], ["peak RSS (MB)", meta.get("peak_rss_mb")]]
    t = meta.get("timings")
    if isinstance(t, dict):
        run_rows += [[f"time: {k} (s)", _fmt(v, 1)] for k, v in t.items()]
    rep.text("<h3>Run</h3>" + _table(["", ""], run_rows, "kv"))
    pcb, pca = before.get("per_class_test_acc"), after.get("per_class_test_acc")
    if isinstance(pcb, list) and pcb:
        rep.figure("per_class_accuracy", F.per_class_accuracy_bars(pcb, pca if isinstance(pca, list) else None,
                                                                    class_names))
    else:
        rep.note_missing("per-class accuracy (metrics.*.per_class_test_acc)")


def _history_section(rep: _Report, meta: dict) -> None:
    rep.section("history", "Unlearning history", "Loss terms and forget accuracy after every update step.")
    hist = meta.get("history")
    if not isinstance(hist, list) or not any(isinstance(h, dict) and "step" in h for h in hist):
        rep.note_missing("training history (run.json has no history)")
        return
    rep.figure("history", F.history_curves(hist))


def _drift_section(rep: _Report, meta: dict, audit: dict, labels: np.ndarray | None, groups: np.ndarray | None,
                   class_names: list[str], method: str, space: str) -> None:
    rep.section("drift", "Embedding drift",
                "A 2-D map is fitted once on the ORIGINAL model's features of the audit sample (forget set plus "
                "retained and test samples per class). The unlearned model's features are placed in that same map, "
                "so a point that moves was moved by unlearning. Forget samples are stars with black outlines.")
    if labels is None or groups is None or "feats_before" not in audit:
        rep.note_missing("embedding drift (audit.npz lacks labels / group / feats_before)")
        return
    if space not in ("backbone", "prediction"):
        raise ValueError(f"drift space must be backbone or prediction, not {space!r}")
    after_key = "backbone_after" if space == "backbone" and "backbone_after" in audit else "feats_after"
    if after_key not in audit:
        rep.note_missing("embedding drift (audit.npz lacks feats_after and backbone_after)")
        return
    if space == "backbone" and after_key != "backbone_after":
        rep.text('<p class="note">This run has no backbone features; the drift uses the prediction-path '
                 "features, which for StructGuard are the projector's output.</p>")
    n_classes = len(class_names)
    t0 = time.perf_counter()
    drift, reducer = embedding_drift(audit["feats_before"], audit[after_key], labels, groups,
                                     n_classes=n_classes, method=method)
    rep.seconds["drift compute"] = time.perf_counter() - t0
    s = drift.summary()
    note = f" ({html.escape(drift.note)})" if drift.note else ""
    rep.text(f"<p>Map: <b>{drift.method.upper()}</b>{note}, {s['n']} samples, features "
             f"<code>{after_key}</code> against <code>feats_before</code>. Displacements are in units of the typical "
             f"within-class radius of the original map ({drift.scale:.3g} map units), so runs compare.</p>")
    rows = []
    for g in ("forget", "retain", "test", "all"):
        st = s[g]
        if st["n"]:
            rows.append([g, st["n"], _fmt(st["median"]), _fmt(st["mean"]), _fmt(st["rel_feature_shift"], 3)])
    rep.text(_table(["group", "n", "median displacement", "mean displacement",
                     "median relative feature change ||Δf||/||f||"], rows))
    rep.figure("drift", F.drift_scatter(drift.before, drift.after, labels, groups, class_names, method=drift.method))
    rep.figure("drift_per_class", F.drift_class_bars(drift.per_class, class_names,
                                                    forget_median=s["forget"].get("median")))
    absent = [class_names[r["class"]] for r in drift.per_class if r["absent"]]
    if absent:
        rep.note_missing(f"drift of classes absent from the audit sample: {', '.join(absent)}")
    rep.text(_table(["class", "n", "n forget", "median displ.", "centroid shift", "spread before", "spread after",
                     "rel. feature change"],
                    [[class_names[r["class"]], r["n"], r["n_forget"], r["median"], r["centroid_shift"],
                      r["spread_before"], r["spread_after"], _fmt(r["rel_feature_shift"], 3)]
                     for r in drift.per_class], "compact"))

    # timeline: every frame goes through the same transform, so an unchanged model does not move
    if "snapshots" not in audit or "snapshot_steps" not in audit or not len(audit["snapshot_steps"]):
        rep.note_missing("drift timeline (the run stored no feature snapshots)")
        return
    snaps, steps = audit["snapshots"], [int(s) for s in audit["snapshot_steps"]]
    if snaps.ndim != 3 or snaps.shape[1] != len(labels):
        rep.note_missing(f"drift timeline (snapshots have shape {snaps.shape}, expected [T, {len(labels)}, d])")
        return
    t0 = time.perf_counter()
    frames = project_snapshots(reducer, snaps)
    rep.seconds["timeline compute"] = time.perf_counter() - t0
    hist = {int(h["step"]): h.get("forget_acc") for h in meta.get("history", []) or []
            if isinstance(h, dict) and "step" in h}
    notes = [f"forget accuracy {hist[s]:.0f}%" if isinstance(hist.get(s), (int, float)) else "" for s in steps]
    before_xy = None
    if steps[0] != 0:
        before_xy = reducer.transform(audit["feats_before"])
    spread = [_spread(fr, labels, groups) for fr in frames]
    rep.text(f"<p>{len(steps)} snapshots of the backbone features between step {steps[0]} and {steps[-1]}. "
             f"Press Play or drag the slider. Mean within-class spread of retained/test points, first → last "
             f"snapshot: {spread[0]:.2f} → {spread[-1]:.2f} (map units; a collapse shrinks or scrambles "
             "the clusters).</p>")
    rep.figure("timeline", F.drift_timeline(frames, steps, labels, groups, class_names, before_xy=before_xy,
                                            frame_notes=notes))


def _spread(xy: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    keep = groups != "forget"
    d = [np.linalg.norm(xy[keep & (labels == c)] - xy[keep & (labels == c)].mean(0), axis=1).mean()
         for c in np.unique(labels[keep])]
    return float(np.mean(d)) if d else float("nan")


def _affinity_section(rep: _Report, audit: dict, labels: np.ndarray | None, groups: np.ndarray | None,
                      class_names: list[str]) -> None:
    rep.section("affinity", "Anchor affinity",
                "Affinity of a sample = cosine between its feature (mapped by R into the anchor space) and each "
                "class anchor (the text embedding of the class's attribute list): S = norm(f R) Aᵀ.")
    if "anchors" in audit:
        rep.figure("anchor_similarity", F.anchor_similarity_heatmap(aff.anchor_similarity(audit["anchors"]),
                                                                   class_names))
    else:
        rep.note_missing("anchor similarity (audit.npz lacks anchors)")
    s_ori, s_unl = audit.get("affinity_before"), audit.get("affinity_after")
    if (s_ori is None or s_unl is None) and all(k in audit for k in ("feats_before", "feats_after", "anchors")):
        r = audit.get("R")
        s_ori = aff.sample_affinity(audit["feats_before"], audit["anchors"], r)
        s_unl = aff.sample_affinity(audit["feats_after"], audit["anchors"], r)
        rep.text('<p class="note">Affinities recomputed from the stored features, anchors and R.</p>')
    if s_ori is None or s_unl is None or labels is None or groups is None:
        rep.note_missing("sample affinity S_ori / S_unl (audit.npz lacks affinity_before/after and the inputs to "
                         "recompute them)")
        return
    cos = aff.row_cosine(s_ori, s_unl)
    summ = aff.row_cosine_summary(cos, groups)
    rep.text(_table(["group", "n", "mean row cosine", "median", "10th percentile"],
                    [[g, v["n"], _fmt(v.get("mean"), 4), _fmt(v.get("median"), 4), _fmt(v.get("p10"), 4)]
                     for g, v in summ.items() if v["n"]]))
    rep.figure("affinity", F.affinity_heatmaps(s_ori, s_unl, labels, groups, class_names))
    keep = groups != "forget"
    n_classes = len(class_names)
    rep.figure("class_mean_affinity", F.class_mean_heatmaps(
        aff.class_mean_affinity(s_ori[keep], labels[keep], n_classes),
        aff.class_mean_affinity(s_unl[keep], labels[keep], n_classes), class_names,
        title="Class-mean anchor affinity of retained and test samples (rows: class of the samples, "
              "columns: anchors)"))
    rep.figure("row_cosine", F.row_cosine_histogram(cos, groups))


def _gradcam_section(rep: _Report, run_dir: Path, meta: dict, audit: dict, class_names: list[str], n_forget: int,
                     device: str | None) -> None:
    rep.section("gradcam", "Grad-CAM before and after",
                "Evidence for the TRUE label from the last convolutional stage (captum LayerGradCam), upsampled to "
                "the image and overlaid. Before and after of one image share one colour scale, so evidence that "
                "disappears fades. Left: forget images; right: retained images of the same classes.")
    import torch

    from .audit.gradcam import grad_cam_before_after, overlay
    from .data import load_dataset
    from .engine import load_unlearned
    from .models import load_model

    groups, ids, labels = audit.get("group"), audit.get("ids"), audit.get("labels")
    if groups is None or ids is None or labels is None:
        rep.note_missing("Grad-CAM (audit.npz lacks ids / group / labels)")
        return
    groups = groups.astype(str)
    try:
        after_model = load_unlearned(run_dir)
    except Exception as exc:
        rep.note_missing(f"Grad-CAM (the unlearned model cannot be loaded: {exc})")
        return
    parent = meta.get("parent_run")
    if parent:
        before_model = load_unlearned(run_dir.parent / parent)
        before_src = f"parent run {parent}"
    else:
        name = _get(meta, "model", "name")
        if not name:
            rep.note_missing("Grad-CAM (run.json does not name the original model)")
            return
        loaded = load_model(name)
        before_model, before_src = loaded.model, f"model {name}"
        want = _get(meta, "model", "weights_sha256")
        if want and loaded.card.get("weights_sha256") != want:
            rep.text(f'<p class="note">Warning: the weights of {html.escape(name)} changed since this run '
                     "(sha256 differs); the 'original' maps use the current file.</p>")
    ds_name = _get(meta, "dataset", "name") or "fashion-mnist"
    ds = load_dataset(ds_name, _get(meta, "request", "data_dir"))

    f_rows = [i for i in np.flatnonzero(groups == "forget") if ids[i] >= 0][:n_forget]
    if (groups == "forget").sum() > len(f_rows) and any(ids[groups == "forget"] < 0):
        rep.text('<p class="note">Uploaded forget images are not stored in the run; they are not shown.</p>')
    r_rows = []
    for i in f_rows:  # a retained image of the same class for each forget image
        cand = [j for j in np.flatnonzero((groups == "retain") & (labels == labels[i])) if j not in r_rows]
        if cand:
            r_rows.append(cand[0])
    if not r_rows:
        r_rows = list(np.flatnonzero(groups == "retain")[:max(1, n_forget)])
    if not f_rows:
        rep.note_missing("Grad-CAM of forget images (none stored with a dataset id)")
    rows = f_rows + r_rows
    if not rows:
        rep.note_missing("Grad-CAM (no forget or retained images in the audit sample)")
        return
    split_of = {"forget": ds.train, "retain": ds.train, "test": ds.test}
    images = torch.cat([split_of[groups[i]].images(split_of[groups[i]].positions([int(ids[i])])) for i in rows])
    targets = labels[rows]
    dev = torch.device(device) if device else torch.device("cpu")
    before_model, after_model = before_model.to(dev).eval(), after_model.to(dev).eval()
    cb, ca = grad_cam_before_after(before_model, after_model, images, targets, device=dev)
    img_np = images.numpy()
    caps = [f"<b>{'forget' if groups[i] == 'forget' else 'retained'}</b><br>{html.escape(class_names[int(labels[i])])}"
            f" · id {int(ids[i])}" for i in rows]
    sub_b = [f"pred {html.escape(class_names[p])}<br>p(true)={q:.2f}" for p, q in zip(cb.pred, cb.prob_target)]
    sub_a = [f"pred {html.escape(class_names[p])}<br>p(true)={q:.2f}" for p, q in zip(ca.pred, ca.prob_target)]
    rep.figure("gradcam", F.gradcam_gallery(img_np, overlay(img_np, cb.cams), overlay(img_np, ca.cams), caps,
                                            sub_before=sub_b, sub_after=sub_a))
    nf = len(f_rows)

    def kept(sl: slice) -> str:
        b, a = float(cb.cams[sl].sum()), float(ca.cams[sl].sum())
        return f"{100 * a / b:.0f}%" if b > 0 else "n/a"
    rep.text(f"<p>'Original' is {html.escape(before_src)}; 'unlearned' is this run's model. True-label evidence "
             f"kept after unlearning (sum of the maps, after / before): forget images {kept(slice(0, nf))}, "
             f"retained images {kept(slice(nf, None))}.</p>")


def _mia_section(rep: _Report, audit: dict) -> None:
    rep.section("mia", "Membership inference", "")
    res = mia_before_after(audit)
    if not res:
        rep.note_missing("membership inference (audit.npz lacks retain/test/forget confidences)")
    else:
        rows = []
        for side in ("before", "after"):
            r = res.get(side)
            if r is None:
                rep.note_missing(f"membership inference {side} unlearning (confidences missing)")
                continue
            rows.append(["original" if side == "before" else "unlearned", _fmt(r.threshold, 4),
                         _fmt(r.attack_accuracy, 3), _fmt(r.auc, 3), _fmt(100 * r.member_rate_retain, 1),
                         _fmt(100 * r.member_rate_test, 1), _fmt(100 * r.member_rate_forget, 1),
                         f"{r.n_retain} / {r.n_test} / {r.n_forget}"])
        rep.text(_table(["model", "threshold t", "attack accuracy (balanced)", "AUC", "retain called member %",
                         "test called member %", "forget called member %", "n retain / test / forget"], rows))
        if any(r.n_forget < 10 for r in res.values()):
            rep.text('<p class="note">Fewer than 10 forget samples: the forget member rate moves in large steps '
                     "and is a weak signal on its own.</p>")
        rep.figure("mia", F.mia_figure(res["before"].as_dict() if "before" in res else None,
                                       res["after"].as_dict() if "after" in res else None))
    rep.text("<h3>Definition</h3><pre class='definition'>" + html.escape(MIA_DEFINITION) + "</pre>")


def _provenance_section(rep: _Report, meta: dict, run_dir: Path) -> None:
    rep.section("provenance", "Provenance: configuration, hashes, anchors")
    m = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    a = meta.get("anchors") if isinstance(meta.get("anchors"), dict) else {}
    ds = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
    rows = [["run id", meta.get("run_id", run_dir.name)], ["created", meta.get("created")],
            ["method", meta.get("method")], ["seed", meta.get("seed")], ["parent run", meta.get("parent_run")],
            ["model", m.get("name")], ["architecture", m.get("arch")],
            ["model weights sha256", m.get("weights_sha256")], ["model card sha256", m.get("card_sha256")],
            ["dataset", f"{ds.get('name')} from {ds.get('source_kind')} ({ds.get('source')})" if ds else None],
            ["anchor encoder", a.get("encoder")], ["anchor hash", a.get("hash")],
            ["code version", meta.get("code_version")]]
    env = meta.get("environment")
    if isinstance(env, dict):
        rows += [[f"environment: {k}", v] for k, v in env.items()]
    rep.text(_table(["", ""], rows, "kv"))
    if not m or not a:
        rep.note_missing("part of the provenance (run.json lacks " + " and ".join(
            n for n, d in (("model", m), ("anchors", a)) if not d) + ")")
    ids = meta.get("forget_ids")
    if isinstance(ids, list):
        shown = ", ".join(map(str, ids[:200])) + (" …" if len(ids) > 200 else "")
        rep.text(f"<h3>Forget set ({len(ids)} training ids)</h3><p class='ids'>{html.escape(shown)}</p>")
    texts = a.get("texts")
    if isinstance(texts, dict) and texts:
        rep.text("<h3>Anchor texts (attributes per class)</h3>" + _table(
            ["class", "attributes"], [[c, "; ".join(map(str, v)) if isinstance(v, list) else v]
                                      for c, v in texts.items()]))
        for w in a.get("warnings") or []:
            rep.text(f'<p class="note">Anchor warning: {html.escape(str(w))}</p>')
    cfg = meta.get("config")
    if isinstance(cfg, dict):
        rep.text("<h3>Configuration</h3><pre>" + html.escape(json.dumps(cfg, indent=2, default=str)) + "</pre>")
    else:
        rep.note_missing("configuration (run.json lacks config)")


# ---------------------------------------------------------------------------------------------- page


_CSS = """
body{font-family:Inter,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f2933;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px;font-size:22px} header .sub{opacity:.8;font-size:13px}
nav{padding:8px 32px;background:#eef1f4;font-size:13px;position:sticky;top:0;z-index:5}
nav a{margin-right:14px;color:#1f2933}
main{padding:8px 32px 40px;max-width:1280px}
h2{border-bottom:2px solid #d9dee3;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px;background:#fff}
th,td{border:1px solid #d9dee3;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4} table.compact td{padding:2px 6px}
.good{color:#1b7f3b;font-weight:600} .bad{color:#b42318;font-weight:600} .neutral{color:#666}
.missing{background:#fff4e5;border-left:4px solid #f79009;padding:6px 10px;margin:8px 0;font-size:13px}
.missing-box{background:#fff4e5;border:1px solid #f79009;padding:8px 14px;margin:14px 0}
.note{color:#555;font-size:13px} .intro{color:#444}
.fig{background:#fff;border:1px solid #e4e7eb;margin:10px 0;padding:4px}
pre{background:#fff;border:1px solid #e4e7eb;padding:10px;font-size:12px;white-space:pre-wrap}
.ids{font-family:monospace;font-size:12px;word-break:break-all}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.card{background:#fff;border:1px solid #d9dee3;padding:10px 14px;min-width:150px}
.card .v{font-size:22px;font-weight:600} .card .l{font-size:12px;color:#555}
"""


def _cards(meta: dict) -> str:
    b, a = _get(meta, "metrics", "before") or {}, _get(meta, "metrics", "after") or {}
    out = []
    for key, label in (("forget_acc", "forget accuracy"), ("test_acc", "test accuracy"),
                       ("retain_acc", "retain accuracy")):
        if isinstance(a.get(key), (int, float)):
            prev = f" (was {b[key]:.1f})" if isinstance(b.get(key), (int, float)) else ""
            out.append(f'<div class="card"><div class="v">{a[key]:.1f}%</div><div class="l">{label}{prev}</div></div>')
    s = a.get("structure") if isinstance(a.get("structure"), dict) else {}
    if isinstance(s.get("affinity_cosine"), (int, float)):
        out.append(f'<div class="card"><div class="v">{s["affinity_cosine"]:.3f}</div>'
                   '<div class="l">affinity row cosine</div></div>')
    return f'<div class="cards">{"".join(out)}</div>' if out else ""


def _page(meta: dict, run_dir: Path, rep: _Report, absent: list[str]) -> str:
    title = f"Unlearning audit: {meta.get('run_id', run_dir.name)}"
    sub = " · ".join(html.escape(str(x)) for x in (
        meta.get("method"), f"k={meta.get('k', len(meta.get('forget_ids') or []) or '?')}",
        _get(meta, "model", "name"),
        _get(meta, "anchors", "encoder") and f"anchors: {_get(meta, 'anchors', 'encoder')}",
        meta.get("created"), f"status: {meta.get('status', 'unknown')}") if x)
    missing = list(rep.missing)
    if absent:
        missing.append(f"classes absent from the audit sample (no retained/test samples): {', '.join(absent)}")
    box = ""
    if missing:
        items = "".join(f"<li>{html.escape(m)}</li>" for m in dict.fromkeys(missing))
        box = f'<div class="missing-box" id="missing"><b>Missing or incomplete in this run</b><ul>{items}</ul></div>'
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in rep.toc)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<meta name='generator' content='StructGuard Studio core.report'><style>{_CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<header><h1>{html.escape(title)}</h1><div class='sub'>{sub}</div></header><nav>{nav}</nav><main>"
            f"{_cards(meta)}{box}{''.join(rep.parts)}"
            f"<p class='note'>Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by "
            f"<code>python -m core report</code>. Everything needed to view it is inside this file.</p>"
            "</main></body></html>")


# ------------------------------------------------------------------------------------------ png export


def find_chromium() -> str | None:
    """A Chrome/Chromium for kaleido: $BROWSER_PATH, then the Debian paths, then PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).is_file():
        return env
    for p in CHROMIUM_CANDIDATES:
        if Path(p).is_file():
            return p
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if found := shutil.which(name):
            return found
    return None


def export_pngs(figs: dict[str, go.Figure], out_dir: str | Path, *, width: int = 1200) -> tuple[list[Path], str]:
    """PNG of every figure through kaleido 1.x and a local Chromium; skipped (with the reason) when absent."""
    browser = find_chromium()
    if browser is None:
        return [], "PNG export skipped: no Chromium/Chrome found (install chromium or set BROWSER_PATH)"
    try:
        import kaleido
    except ImportError:
        return [], "PNG export skipped: kaleido is not installed"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs, paths = [], []
    for name, fig in figs.items():
        path = out_dir / f"{name}.png"
        h = int(fig.layout.height or 450)
        specs.append({"fig": fig.to_dict(), "path": path, "opts": {"format": "png", "width": width, "height": h,
                                                                  "scale": 1}})
        paths.append(path)
    try:
        # mathjax=False: kaleido would otherwise pull MathJax from a CDN; plotly.js comes from the plotly package
        kaleido.write_fig_from_object_sync(specs, kopts={"path": browser, "mathjax": False})
    except Exception as exc:
        return [p for p in paths if p.is_file()], f"PNG export failed with {browser}: {type(exc).__name__}: {exc}"
    done = [p for p in paths if p.is_file()]
    return done, f"{len(done)} PNG files written to {out_dir} with {browser}"
