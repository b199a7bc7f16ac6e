"""Self-contained HTML audit report of one run directory (plotly inline, images embedded, opens offline).

The numbers and pictures come from core.audit.views (shared with the dashboard); the page is rendered
by the Jinja2 template core/templates/report.html.j2 with autoescaping.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from markupsafe import Markup
from plotly.offline import get_plotlyjs

from . import figures as F
from .audit.mia import MIA_DEFINITION, mia_before_after
from .audit.views import (
    TOW_DEFINITION,
    accuracy_rows,
    affinity_view,
    drift_view,
    gradcam_view,
    polish_record,
    returned_step,
)
from .downloads import env_flag
from .runs import storage_error, write_atomic

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
    figs: dict[str, go.Figure] = field(default_factory=dict, repr=False)  # the drawn figures, by name


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


@dataclass
class _Section:
    anchor: str
    title: str
    intro: str = ""
    blocks: list[dict] = field(default_factory=list)


class _Report:
    """Collects sections of typed blocks (the template renders them), figures and what is missing."""

    def __init__(self) -> None:
        self.sections: list[_Section] = []
        self.missing: list[str] = []
        self.figs: dict[str, go.Figure] = {}
        self.seconds: dict[str, float] = {}

    def section(self, anchor: str, title: str, intro: str = "") -> None:
        self.sections.append(_Section(anchor, title, intro))

    def block(self, kind: str, text: Any = "", **extra: Any) -> None:
        self.sections[-1].blocks.append({"kind": kind, "text": text, "cls": "", **extra})

    def note_missing(self, what: str) -> None:
        self.missing.append(what)
        self.block("missing", what)

    def table(self, header: list[str], rows: list[list[Any]], cls: str = "") -> None:
        self.block("table", header=header, rows=[[c if isinstance(c, dict) else _fmt(c) for c in r] for r in rows],
                   cls=cls)

    def figure(self, name: str, fig: go.Figure) -> None:
        self.figs[name] = fig
        div = pio.to_html(fig, full_html=False, include_plotlyjs=False, auto_play=False, div_id=f"fig-{name}",
                          config={"displaylogo": False, "responsive": True})
        self.block("figure", name=name, html=Markup(div))  # plotly's own markup: trusted, not escaped

    def run(self, label: str, fn: Callable[[], None]) -> None:
        """Run one section; an unexpected failure becomes a 'missing' note instead of killing the report."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:
            self.note_missing(f"{label}: failed with {type(exc).__name__}: {exc}")
            if env_flag("STRUCTGUARD_DEBUG"):
                traceback.print_exc()
        self.seconds[label] = time.perf_counter() - t0


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{nd}f}"
    return str(v)


def _delta(d: Any, nd: int = 2, good: str = "up") -> dict | str:
    """A coloured difference cell: green when it moves the way unlearning should."""
    if not isinstance(d, (int, float)):
        return "—"
    cls = "neutral" if abs(d) < 10 ** -nd else ("good" if (d > 0) == (good == "up") else "bad")
    return {"delta": f"{d:+.{nd}f}", "cls": cls}


def build_report(run_dir: str | Path, out: str | Path | None = None, *, png_dir: str | Path | None = None,
                 drift_method: str | None = None, drift_space: str = "prediction", gradcam: bool = True,
                 n_gradcam: int = 4, device: str | None = None,
                 progress: Callable[[str], None] | None = None) -> ReportResult:
    """Write the HTML audit report of `run_dir` (default: `<run_dir>/report.html`) and optional PNGs.

    The pictures come from core.audit.views, the same functions the dashboard's Audit page draws.
    """
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

    sections: list[tuple[str, Callable[[], None]]] = [
        ("metrics", lambda: _metrics_section(rep, meta, class_names)),
        ("history", lambda: _history_section(rep, meta)),
        ("drift", lambda: _drift_section(rep, run_dir, meta, audit, class_names, drift_method, drift_space)),
        ("affinity", lambda: _affinity_section(rep, audit, class_names)),
        ("Grad-CAM", lambda: _gradcam_section(rep, run_dir, meta, audit, class_names, n_gradcam, device)),
        ("membership inference", lambda: _mia_section(rep, audit)),
        ("provenance", lambda: _provenance_section(rep, meta, run_dir)),
    ]
    for label, fn in sections:
        if label == "Grad-CAM" and not gradcam:
            continue
        say(label.lower())
        rep.run(label, fn)

    absent = _absent_classes(labels, groups, n_classes, class_names)
    doc = _page(meta, run_dir, rep, absent)
    # a hidden temporary file renamed into place; removed on failure (full disk: StorageError, one line)
    write_atomic(out, doc, what="the report")
    result = ReportResult(out, rep.missing, list(rep.figs), seconds=rep.seconds, figs=rep.figs)
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
    for r in accuracy_rows(meta):
        nd = 3 if r["key"] == "dim_alignment" else 2
        rows.append([r["label"], _fmt(r["before"], nd), _fmt(r["after"], nd), _delta(r["delta"], nd, r["good"])]
                    + ([_fmt(r["retrain"]), _fmt(r["gap"])] if ref else []))
    fa = after.get("forget_acc")
    if isinstance(fa, (int, float)):
        success = ["Forget success 100 - A_f (%)", _fmt(100 - before.get("forget_acc", np.nan)), _fmt(100 - fa), ""]
        rows.insert(1, success + ([_fmt(100 - ref.get("forget_acc", np.nan)), ""] if ref else []))
    rep.table(["metric", "original", "unlearned", "Δ"] + (["retrained", "unlearned − retrained"] if ref else []),
              rows, "metrics")
    if ref is not None:
        mia, auc = ref.get("mia_forget_member_rate") or {}, ref.get("mia_forget_auc")
        rep.block("text", Markup(
            "Retrain reference: the base model's recipe trained from scratch without the forget set "
            "(<code>{}</code>, made by <code>{}</code>). Tug-of-War score {}: {} "
            "Forget samples called members by the confidence attack: unlearned {}, retrained {}{}").format(
            ref.get("card"), ref.get("command"), _fmt(ref.get("tug_of_war"), 3), TOW_DEFINITION,
            _fmt(mia.get("unlearned"), 3), _fmt(mia.get("retrain"), 3),
            "." if not auc else "; forget AUC vs test (0.5: like unseen data): unlearned {}, retrained {}.".format(
                _fmt(auc.get("unlearned"), 3), _fmt(auc.get("retrain"), 3))))
    extra = f"Retain accuracy measured on: {after.get('retain_set', 'unknown')}."
    if "dim_alignment_energy" in after:
        extra += (" Dimensional alignment: share of the forget features' energy inside the top eigenspace holding "
                  f"{after['dim_alignment_energy']:.0%} of the retained features' energy.")
    rep.block("text", extra)
    srows = [[label, _fmt(s.get("affinity_cosine"), 3), _fmt(s.get("cka"), 3), _fmt(s.get("knn_overlap"), 3)]
             for key, label in (("structure", "prediction path"), ("structure_backbone", "backbone h(x)"))
             if isinstance(s := after.get(key), dict)]
    if srows:
        rep.block("heading", "Structure preservation on retained and test samples (1 = unchanged)")
        rep.table(["features", "affinity row cosine", "linear CKA", "kNN overlap (k=10)"], srows)
    else:
        rep.note_missing("structure scores (metrics.after.structure)")
    run_rows = [["stop reason", meta.get("stop_reason")], ["update steps", meta.get("steps")],
                *([["weights returned", r]] if (r := returned_step(meta)) else []),
                ["device", meta.get("device")], ["update steps computed in", meta.get("precision")],
                ["retain and test rows measured in (forget set: fp32)", meta.get("eval_precision", "fp32")],
                ["peak RSS during the run (MB)", meta.get("peak_rss_mb")]]
    t = meta.get("timings")
    if isinstance(t, dict):
        run_rows += [[f"time: {k} (s)", _fmt(v, 1)] for k, v in t.items()]
    rep.block("heading", "Run")
    rep.table(["", ""], run_rows, "kv")
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
    rep.figure("history", F.history_curves(hist, polish=polish_record(meta)))


def _drift_section(rep: _Report, run_dir: Path, meta: dict, audit: dict, class_names: list[str],
                   method: str | None, space: str) -> None:
    rep.section("drift", "Embedding drift",
                "A 2-D map is fitted once on the ORIGINAL model's features of the audit sample (forget set plus "
                "retained and test samples per class). The unlearned model's features are placed in that same map, "
                "so a point that moves was moved by unlearning. Forget samples are stars with black outlines.")
    if not all(k in audit for k in ("labels", "group", "feats_before", "feats_after")):
        rep.note_missing("embedding drift (audit.npz lacks labels / group / feats_before / feats_after)")
        return
    if space == "backbone" and "backbone_after" not in audit:
        rep.block("note", "This run has no backbone features; the drift uses the prediction-path features, "
                          "which for StructGuard are the projector's output.")
        space = "prediction"
    t0 = time.perf_counter()
    view = drift_view(run_dir, audit, meta, method=method, n_classes=len(class_names), space=space)
    rep.seconds["drift compute"] = time.perf_counter() - t0
    drift, labels, groups = view.result, view.result.labels, view.result.groups
    s = drift.summary()
    rep.block("text", Markup(
        "Map: <b>{}</b>{}, {} samples, features <code>{}</code>. Displacements are in units of the typical "
        "within-class radius of the original map ({} map units), so runs compare.").format(
        drift.method.upper(), f" ({drift.note})" if drift.note else "", s["n"], view.features, f"{drift.scale:.3g}"))
    rep.table(["group", "n", "median displacement", "mean displacement",
               "median relative feature change ||Δf||/||f||"],
              [[g, s[g]["n"], s[g]["median"], s[g]["mean"], _fmt(s[g]["rel_feature_shift"], 3)]
               for g in ("forget", "retain", "test", "all") if s[g]["n"]])
    rep.figure("drift", F.drift_scatter(drift.before, drift.after, labels, groups, class_names, method=drift.method))
    rep.figure("drift_per_class", F.drift_class_bars(drift.per_class, class_names,
                                                    forget_median=s["forget"].get("median")))
    absent = [class_names[r["class"]] for r in drift.per_class if r["absent"]]
    if absent:
        rep.note_missing(f"drift of classes absent from the audit sample: {', '.join(absent)}")
    rep.table(["class", "n", "n forget", "median displ.", "centroid shift", "spread before", "spread after",
               "rel. feature change"],
              [[class_names[r["class"]], r["n"], r["n_forget"], r["median"], r["centroid_shift"], r["spread_before"],
                r["spread_after"], _fmt(r["rel_feature_shift"], 3)] for r in drift.per_class], "compact")
    if space == "backbone":
        return
    if view.frames is None:
        rep.note_missing("drift timeline (the run stored no feature snapshots)")
        return
    steps = view.steps
    rep.block("text", f"{len(steps)} snapshots of the prediction-path features between step {steps[0]} and "
                      f"{steps[-1]}. Press Play or drag the slider. Mean within-class spread of retained/test points, "
                      f"first → last snapshot: {view.spread[0]:.2f} → {view.spread[-1]:.2f} (map units; a collapse "
                      "shrinks or scrambles the clusters).")
    rep.figure("timeline", F.drift_timeline(view.frames, steps, labels, groups, class_names,
                                            before_xy=view.before_xy, frame_notes=view.frame_notes))


def _affinity_section(rep: _Report, audit: dict, class_names: list[str]) -> None:
    rep.section("affinity", "Anchor affinity",
                "Affinity of a sample = cosine between its feature (mapped by R into the anchor space) and each "
                "class anchor (the text embedding of the class's attribute list): S = norm(f R) Aᵀ.")
    if "anchors" not in audit:
        rep.note_missing("anchor similarity and sample affinity (audit.npz lacks anchors)")
        return
    try:
        view = affinity_view(audit, len(class_names))
    except KeyError as exc:
        rep.note_missing(f"sample affinity S_ori / S_unl (audit.npz lacks {exc} and the stored affinities)")
        return
    groups, labels = audit["group"].astype(str), audit["labels"].astype(np.int64)
    rep.figure("anchor_similarity", F.anchor_similarity_heatmap(view.anchor_similarity, class_names))
    if view.recomputed:
        rep.block("note", "Affinities recomputed from the stored features, anchors and R.")
    rep.table(["group", "n", "mean row cosine", "median", "10th percentile"],
              [[g, v["n"], _fmt(v.get("mean"), 4), _fmt(v.get("median"), 4), _fmt(v.get("p10"), 4)]
               for g, v in view.summary.items() if v["n"]])
    rep.figure("affinity", F.affinity_heatmaps(view.s_ori, view.s_unl, labels, groups, class_names))
    rep.figure("class_mean_affinity", F.class_mean_heatmaps(
        view.class_mean_before, view.class_mean_after, class_names,
        title="Class-mean anchor affinity of retained and test samples (rows: class of the samples, "
              "columns: anchors)"))
    rep.figure("row_cosine", F.row_cosine_histogram(view.row_cosine, groups))


def _gradcam_section(rep: _Report, run_dir: Path, meta: dict, audit: dict, class_names: list[str], n_forget: int,
                     device: str | None) -> None:
    rep.section("gradcam", "Grad-CAM before and after",
                "Evidence for the TRUE label from the last convolutional stage (captum LayerGradCam), upsampled to "
                "the image and overlaid. Before and after of one image share one colour scale, so evidence that "
                "disappears fades. Left: forget images; right: retained images of the same classes.")
    if not all(k in audit for k in ("group", "ids", "labels")):
        rep.note_missing("Grad-CAM (audit.npz lacks ids / group / labels)")
        return
    from .audit.gradcam import overlay  # captum: imported when a report draws Grad-CAM

    try:
        view = gradcam_view(run_dir, audit, meta, n_forget, device)
    except Exception as exc:  # a missing model, parent run or dataset: say which
        rep.note_missing(f"Grad-CAM ({exc})")
        return
    for warning in view.warnings:
        rep.block("note", f"Warning: {warning}.")
    for note in view.notes:
        rep.block("note", note[:1].upper() + note[1:] + ".")
    if view.n_forget == 0:
        rep.note_missing("Grad-CAM of forget images (none stored with a dataset id)")
    groups = audit["group"].astype(str)[view.rows]
    # plotly renders its own small HTML subset in annotations: escape the class names it shows
    kinds = ["forget" if g == "forget" else "retained" for g in groups]
    caps = [f"<b>{kind}</b><br>{html.escape(class_names[int(lbl)])} · id {int(i)}"
            for kind, lbl, i in zip(kinds, view.labels, view.ids, strict=True)]

    def subtitles(pred: np.ndarray, prob: np.ndarray) -> list[str]:
        return [f"pred {html.escape(class_names[p])}<br>p(true)={q:.2f}" for p, q in zip(pred, prob, strict=True)]
    sub_b, sub_a = subtitles(view.pred_before, view.prob_before), subtitles(view.pred_after, view.prob_after)
    rep.figure("gradcam", F.gradcam_gallery(view.images, overlay(view.images, view.cams_before),
                                            overlay(view.images, view.cams_after), caps, sub_before=sub_b,
                                            sub_after=sub_a))
    kept = view.evidence_kept()
    pct = {k: "n/a" if v is None else f"{100 * v:.0f}%" for k, v in kept.items()}
    rep.block("text", f"'Original' is {view.before_source}; 'unlearned' is this run's model. True-label evidence "
                      f"kept after unlearning (sum of the maps, after / before): forget images {pct['forget']}, "
                      f"retained images {pct['retained']}.")


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
                         _fmt(r.forget_auc, 3), f"{r.n_retain} / {r.n_test} / {r.n_forget}"])
        rep.table(["model", "threshold t", "attack accuracy (balanced)", "AUC", "retain called member %",
                   "test called member %", "forget called member %",
                   "forget AUC vs test (0.5: like unseen)", "n retain / test / forget"], rows)
        if any(r.n_forget < 10 for r in res.values()):
            rep.block("note", "Fewer than 10 forget samples: the forget member rate moves in large steps and is a "
                              "weak signal on its own.")
        rep.figure("mia", F.mia_figure(res["before"].as_dict() if "before" in res else None,
                                       res["after"].as_dict() if "after" in res else None))
    rep.block("heading", "Definition")
    rep.block("pre", MIA_DEFINITION, cls="definition")


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
    rep.table(["", ""], rows, "kv")
    if not m or not a:
        rep.note_missing("part of the provenance (run.json lacks " + " and ".join(
            n for n, d in (("model", m), ("anchors", a)) if not d) + ")")
    ids = meta.get("forget_ids")
    if isinstance(ids, list):
        rep.block("heading", f"Forget set ({len(ids)} training ids)")
        rep.block("ids", ", ".join(map(str, ids[:200])) + (" …" if len(ids) > 200 else ""))
    texts = a.get("texts")
    if isinstance(texts, dict) and texts:
        rep.block("heading", "Anchor texts (attributes per class)")
        rep.table(["class", "attributes"], [[c, "; ".join(map(str, v)) if isinstance(v, list) else v]
                                            for c, v in texts.items()])
        for w in a.get("warnings") or []:
            rep.block("note", f"Anchor warning: {w}")
    cfg = meta.get("config")
    if isinstance(cfg, dict):
        rep.block("heading", "Configuration")
        rep.block("pre", json.dumps(cfg, indent=2, default=str))
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


def _cards(meta: dict) -> list[dict]:
    b, a = _get(meta, "metrics", "before") or {}, _get(meta, "metrics", "after") or {}
    out = []
    for key, label in (("forget_acc", "forget accuracy"), ("test_acc", "test accuracy"),
                       ("retain_acc", "retain accuracy")):
        if isinstance(a.get(key), (int, float)):
            prev = f" (was {b[key]:.1f})" if isinstance(b.get(key), (int, float)) else ""
            out.append({"value": f"{a[key]:.1f}%", "label": label + prev})
    s = a.get("structure") if isinstance(a.get("structure"), dict) else {}
    if isinstance(s.get("affinity_cosine"), (int, float)):
        out.append({"value": f"{s['affinity_cosine']:.3f}", "label": "affinity row cosine"})
    return out


@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("report.html.j2")


def _page(meta: dict, run_dir: Path, rep: _Report, absent: list[str]) -> str:
    missing = list(rep.missing)
    if absent:
        missing.append(f"classes absent from the audit sample (no retained/test samples): {', '.join(absent)}")
    k = meta.get("k", len(meta.get("forget_ids") or []) or "?")
    encoder = _get(meta, "anchors", "encoder")
    subtitle = [str(x) for x in (meta.get("method"), f"k={k}", _get(meta, "model", "name"),
                                 encoder and f"anchors: {encoder}", meta.get("created"),
                                 f"status: {meta.get('status', 'unknown')}") if x]
    return _template().render(
        title=f"Unlearning audit: {meta.get('run_id', run_dir.name)}", subtitle=subtitle, css=Markup(_CSS),
        plotly_js=Markup(get_plotlyjs()), sections=rep.sections, cards=_cards(meta),
        missing=list(dict.fromkeys(missing)), generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


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
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return [], f"PNG export skipped: {storage_error(exc, 'the PNG files')}"
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
