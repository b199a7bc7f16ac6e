"""Figure builders: plain data in, plotly Figure out. The dashboard and the HTML report call the same functions.

One palette for everything (PALETTE): a colour per class, one colour + marker for
forget samples, and one colour each for "before" (original model) and "after"
(unlearned model). No function here reads files, session state or models.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

__all__ = [
    "PALETTE", "Palette", "affinity_heatmaps", "anchor_similarity_heatmap", "class_color", "class_mean_heatmaps",
    "drift_class_bars", "drift_scatter", "drift_timeline", "gradcam_gallery", "history_curves", "mia_figure",
    "per_class_accuracy_bars", "png_data_uri", "row_cosine_histogram",
]


@dataclass(frozen=True)
class Palette:
    classes: tuple[str, ...] = tuple(qualitative.T10)
    forget: str = "#111111"
    forget_symbol: str = "star"
    before: str = "#8E9AAF"   # original model: muted slate
    after: str = "#D1495B"    # unlearned model: strong red
    segment: str = "rgba(90,90,90,0.25)"
    groups: dict[str, str] = field(default_factory=lambda: {"forget": "#111111", "retain": "#2A9D8F",
                                                            "test": "#E9C46A"})
    diverging: str = "RdBu_r"  # difference maps: blue = lost affinity, red = gained, white = unchanged
    sequential: str = "Viridis"
    font: str = "Inter, Helvetica, Arial, sans-serif"


PALETTE = Palette()


def class_color(c: int, n_classes: int = 10) -> str:
    """Colour of class `c`; the same class has the same colour in every figure."""
    if n_classes <= len(PALETTE.classes):
        return PALETTE.classes[c % len(PALETTE.classes)]
    if n_classes <= len(qualitative.Alphabet):
        return qualitative.Alphabet[c]
    return sample_colorscale("Turbo", [c / max(n_classes - 1, 1)])[0]


def _layout(fig: go.Figure, title: str, height: int = 420, **kw: Any) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01, xanchor="left"), height=height, template="plotly_white",
                      font=dict(family=PALETTE.font, size=12), margin=dict(l=50, r=20, t=60, b=40),
                      legend=dict(itemsizing="constant"), **kw)
    return fig


def _names(class_names: Sequence[str] | None, n: int) -> list[str]:
    names = list(class_names or [])
    return names + [f"class {i}" for i in range(len(names), n)]


def _seg_xy(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Line segments a[i] -> b[i] as one trace (None-separated), far cheaper than one shape per segment."""
    n = len(a)
    xs = np.empty(n * 3, dtype=object)
    ys = np.empty(n * 3, dtype=object)
    xs[0::3], xs[1::3], xs[2::3] = a[:, 0], b[:, 0], None
    ys[0::3], ys[1::3], ys[2::3] = a[:, 1], b[:, 1], None
    return xs, ys


def _r(x: np.ndarray, nd: int = 3) -> np.ndarray:
    return np.round(np.asarray(x, dtype=np.float64), nd)  # smaller HTML, no visible change


def _range(*arrays: np.ndarray, pad: float = 0.05) -> tuple[list[float], list[float]]:
    pts = np.concatenate([a.reshape(-1, 2) for a in arrays if a.size])
    pts = pts[np.isfinite(pts).all(1)]
    if not len(pts):
        return [-1, 1], [-1, 1]
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    span = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - pad * span, hi + pad * span
    return [float(lo[0]), float(hi[0])], [float(lo[1]), float(hi[1])]


# --------------------------------------------------------------------------------------------- drift


def drift_scatter(before: np.ndarray, after: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                  class_names: Sequence[str] | None = None, *, method: str = "umap", max_segments: int = 3000,
                  title: str | None = None) -> go.Figure:
    """Two panels in one coordinate system: the original map, and the unlearned features placed in it.

    Right panel draws each sample's displacement as a grey segment from its original
    position; forget samples are black stars with black segments.
    """
    before, after = np.asarray(before), np.asarray(after)
    labels, groups = np.asarray(labels), np.asarray(groups).astype(str)
    n_classes = int(max(labels.max(initial=-1) + 1, len(class_names or [])))
    names = _names(class_names, n_classes)
    forget = groups == "forget"
    fig = make_subplots(1, 2, shared_xaxes=True, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("Original model", "Unlearned model (same map)"))
    rest = np.flatnonzero(~forget)
    if len(rest) > max_segments:  # keep the picture legible and the file small
        rest = np.random.default_rng(0).choice(rest, max_segments, replace=False)
    sx, sy = _seg_xy(_r(before[rest]), _r(after[rest]))
    fig.add_trace(go.Scatter(x=sx, y=sy, mode="lines", line=dict(color=PALETTE.segment, width=0.7),
                             name="displacement", hoverinfo="skip", legendgroup="seg"), 1, 2)
    for c in range(n_classes):
        m = (labels == c) & ~forget
        if not m.any():
            continue
        for col, xy in ((1, before), (2, after)):
            fig.add_trace(go.Scatter(
                x=_r(xy[m, 0]), y=_r(xy[m, 1]), mode="markers", name=names[c], legendgroup=f"c{c}",
                showlegend=col == 1, marker=dict(size=4, color=class_color(c, n_classes), opacity=0.75),
                hovertemplate=f"{names[c]}<extra></extra>"), 1, col)
    if forget.any():
        fx, fy = _seg_xy(_r(before[forget]), _r(after[forget]))
        fig.add_trace(go.Scatter(x=fx, y=fy, mode="lines", line=dict(color=PALETTE.forget, width=1.5),
                                 name="forget displacement", legendgroup="forget", showlegend=False,
                                 hoverinfo="skip"), 1, 2)
        text = [names[int(c)] for c in labels[forget]]
        for col, xy in ((1, before), (2, after)):
            fig.add_trace(go.Scatter(
                x=_r(xy[forget, 0]), y=_r(xy[forget, 1]), mode="markers", name="forget set", legendgroup="forget",
                showlegend=col == 1, text=text, hovertemplate="forget: %{text}<extra></extra>",
                marker=dict(size=11, symbol=PALETTE.forget_symbol, color=[class_color(int(c), n_classes)
                                                                          for c in labels[forget]],
                            line=dict(color=PALETTE.forget, width=1.5))), 1, col)
    xr, yr = _range(before, after)
    fig.update_xaxes(range=xr, showticklabels=False, zeroline=False)
    fig.update_yaxes(range=yr, showticklabels=False, zeroline=False)
    return _layout(fig, title or f"Embedding drift ({method.upper()} fitted on the original features)", 480)


def drift_class_bars(per_class: list[dict], class_names: Sequence[str] | None = None, *,
                     forget_median: float | None = None, title: str | None = None) -> go.Figure:
    """Median displacement per class (retained/test samples, in units of the typical class radius)."""
    n = len(per_class)
    names = _names(class_names, n)
    xs, ys, colors, texts = [], [], [], []
    for row in per_class:
        c = int(row["class"])
        xs.append(names[c])
        ys.append(None if row.get("absent") or row["median"] != row["median"] else row["median"])
        colors.append(class_color(c, n))
        texts.append("absent from audit sample" if row.get("absent") else f"n={row['n']}")
    fig = go.Figure(go.Bar(x=xs, y=ys, marker_color=colors, text=texts, textposition="outside",
                           name="retained / test", hovertemplate="%{x}: %{y:.2f}<extra></extra>"))
    if forget_median is not None and forget_median == forget_median:
        fig.add_hline(y=forget_median, line=dict(color=PALETTE.forget, dash="dash"),
                      annotation_text=f"forget set median {forget_median:.2f}")
    fig.update_yaxes(title="median displacement / class radius")
    return _layout(fig, title or "Drift per class", 340, showlegend=False)


def drift_timeline(frames_xy: np.ndarray, steps: Sequence[int], labels: np.ndarray, groups: np.ndarray,
                   class_names: Sequence[str] | None = None, *, before_xy: np.ndarray | None = None,
                   frame_notes: Sequence[str] | None = None, max_points: int = 2500,
                   title: str | None = None) -> go.Figure:
    """Animated map of feature snapshots taken during unlearning (one frame per snapshot, with a slider).

    frames_xy [T, M, 2] are snapshots placed with the reducer fitted on the original
    features; `before_xy` (the original map) becomes frame 0. Axis ranges are fixed
    over all frames, so a collapse shows as points converging, not as a zoom.
    """
    frames_xy = np.asarray(frames_xy, dtype=np.float64)
    labels, groups = np.asarray(labels), np.asarray(groups).astype(str)
    steps = [int(s) for s in steps]
    notes = list(frame_notes or [""] * len(steps))
    if before_xy is not None:
        frames_xy = np.concatenate([np.asarray(before_xy, np.float64)[None], frames_xy])
        steps, notes = [0] + steps, ["original"] + notes
        names_f = ["original"] + [f"step {s}" for s in steps[1:]]
    else:
        names_f = [f"step {s}" for s in steps]
    if frames_xy.shape[1] > max_points:  # subsample non-forget points, keep every forget point
        forget_idx = np.flatnonzero(groups == "forget")
        other = np.random.default_rng(0).choice(np.flatnonzero(groups != "forget"),
                                                max_points - len(forget_idx), replace=False)
        keep = np.sort(np.r_[forget_idx, other])
        frames_xy, labels, groups = frames_xy[:, keep], labels[keep], groups[keep]
    n_classes = int(max(labels.max(initial=-1) + 1, len(class_names or [])))
    names = _names(class_names, n_classes)
    forget = groups == "forget"
    present = [c for c in range(n_classes) if ((labels == c) & ~forget).any()]

    def traces(xy: np.ndarray) -> list[go.Scatter]:
        out = [go.Scatter(x=_r(xy[(labels == c) & ~forget, 0]), y=_r(xy[(labels == c) & ~forget, 1]),
                          mode="markers", name=names[c],
                          marker=dict(size=4, color=class_color(c, n_classes), opacity=0.75)) for c in present]
        out.append(go.Scatter(x=_r(xy[forget, 0]), y=_r(xy[forget, 1]), mode="markers", name="forget set",
                              marker=dict(size=11, symbol=PALETTE.forget_symbol,
                                          color=[class_color(int(c), n_classes) for c in labels[forget]],
                                          line=dict(color=PALETTE.forget, width=1.5))))
        return out

    fig = go.Figure(data=traces(frames_xy[0]) if len(frames_xy) else [])
    fig.frames = [go.Frame(data=traces(xy), name=nm, layout=go.Layout(title_text=_tl_title(title, nm, note)))
                  for xy, nm, note in zip(frames_xy, names_f, notes, strict=True)]
    xr, yr = _range(frames_xy)
    fig.update_xaxes(range=xr, showticklabels=False, zeroline=False, autorange=False)
    fig.update_yaxes(range=yr, showticklabels=False, zeroline=False, autorange=False)
    slider_steps = [dict(method="animate", label=nm.replace("step ", ""),
                         args=[[nm], dict(mode="immediate", frame=dict(duration=0, redraw=False),
                                          transition=dict(duration=0))]) for nm in names_f]
    fig.update_layout(
        sliders=[dict(active=0, steps=slider_steps, x=0.16, len=0.84, y=-0.02, yanchor="top", pad=dict(t=10),
                      currentvalue=dict(prefix="snapshot: step ", visible=True))],
        updatemenus=[dict(type="buttons", direction="left", showactive=False, x=0.0, y=-0.02, xanchor="left",
                          yanchor="top", pad=dict(t=30), buttons=[
                              dict(label="Play", method="animate",
                                   args=[None, dict(frame=dict(duration=600, redraw=False), fromcurrent=True,
                                                    transition=dict(duration=300))]),
                              dict(label="Pause", method="animate",
                                   args=[[None], dict(mode="immediate", frame=dict(duration=0, redraw=False))])])])
    _layout(fig, _tl_title(title, names_f[0] if names_f else "", notes[0] if notes else ""), 560)
    fig.update_layout(margin=dict(b=110))
    return fig


def _tl_title(title: str | None, name: str, note: str) -> str:
    base = title or "Embedding timeline during unlearning"
    return f"{base}: {name}" + (f" ({note})" if note and note != name else "")


# ------------------------------------------------------------------------------------------ affinity


def anchor_similarity_heatmap(sim: np.ndarray, class_names: Sequence[str] | None = None, *,
                              title: str | None = None) -> go.Figure:
    """Anchor x anchor cosine similarity (the semantic structure the anchors encode)."""
    sim = np.asarray(sim)
    names = _names(class_names, len(sim))
    fig = go.Figure(go.Heatmap(z=_r(sim), x=names, y=names, colorscale=PALETTE.sequential,
                               zmin=float(np.nanmin(sim)), zmax=1.0, colorbar=dict(title="cos"),
                               texttemplate="%{z:.2f}" if len(sim) <= 12 else None,
                               hovertemplate="%{y} / %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title or "Anchor similarity (text embeddings of the class attributes)", 460)


def _order_rows(labels: np.ndarray, groups: np.ndarray, max_rows: int) -> np.ndarray:
    """Forget rows first, then retained/test rows by class, evenly thinned to `max_rows`."""
    forget = np.flatnonzero(groups == "forget")
    rest = np.flatnonzero(groups != "forget")
    rest = rest[np.argsort(labels[rest], kind="stable")]
    budget = max(max_rows - len(forget), 0)
    if len(rest) > budget:
        rest = rest[np.linspace(0, len(rest) - 1, budget).round().astype(int)] if budget else rest[:0]
    return np.r_[forget[:max_rows], rest]


def _hbar(title: str, x: float, length: float) -> dict:
    """Horizontal colour bar under the panels (vertical ones collide with the neighbouring panel)."""
    return dict(title=dict(text=title, side="top"), orientation="h", x=x, xanchor="center", y=-0.22,
                yanchor="top", len=length, thickness=12)


def affinity_heatmaps(s_ori: np.ndarray, s_unl: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                      class_names: Sequence[str] | None = None, *, max_rows: int = 300,
                      title: str | None = None) -> go.Figure:
    """Sample x anchor affinity: S_ori, S_unl and S_unl - S_ori (forget rows on top, then by class)."""
    s_ori, s_unl = np.asarray(s_ori), np.asarray(s_unl)
    labels, groups = np.asarray(labels), np.asarray(groups).astype(str)
    rows = _order_rows(labels, groups, max_rows)
    names = _names(class_names, s_ori.shape[1])
    ylab = [f"{'F' if groups[i] == 'forget' else groups[i][0].upper()} {names[int(labels[i])]} #{k}"
            for k, i in enumerate(rows)]
    diff = s_unl[rows] - s_ori[rows]
    lim = float(max(np.nanmax(np.abs(diff), initial=0), 1e-6))
    both = np.concatenate([s_ori[rows].ravel(), s_unl[rows].ravel()])
    both = both[np.isfinite(both)]
    zmin, zmax = (float(both.min()), float(both.max())) if len(both) else (0.0, 1.0)
    fig = make_subplots(1, 3, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=("S_ori (original)", "S_unl (unlearned)", "S_unl - S_ori"))
    common = dict(x=names, y=ylab, hovertemplate="%{y} / anchor %{x}: %{z:.3f}<extra></extra>")
    fig.add_trace(go.Heatmap(z=_r(s_ori[rows]), zmin=zmin, zmax=zmax, colorscale=PALETTE.sequential,
                             coloraxis=None, showscale=False, **common), 1, 1)
    fig.add_trace(go.Heatmap(z=_r(s_unl[rows]), zmin=zmin, zmax=zmax, colorscale=PALETTE.sequential,
                             colorbar=_hbar("affinity (original and unlearned)", 0.325, 0.6), **common), 1, 2)
    fig.add_trace(go.Heatmap(z=_r(diff), zmin=-lim, zmax=lim, zmid=0, colorscale=PALETTE.diverging,
                             colorbar=_hbar("Δ (blue: lost, red: gained)", 0.85, 0.28), **common), 1, 3)
    fig.update_yaxes(autorange="reversed", showticklabels=len(rows) <= 60)
    n_forget = int((groups[rows] == "forget").sum())
    if n_forget:  # a line under the forget rows
        for col in (1, 2, 3):
            fig.add_hline(y=n_forget - 0.5, line=dict(color=PALETTE.forget, width=1.5), row=1, col=col)
    sub = f"{len(rows)} of {len(labels)} samples; forget rows above the black line" if n_forget else \
        f"{len(rows)} of {len(labels)} samples"
    _layout(fig, title or f"Sample x anchor affinity ({sub})", 640)
    fig.update_layout(margin=dict(b=150))
    return fig


def class_mean_heatmaps(cm_before: np.ndarray, cm_after: np.ndarray, class_names: Sequence[str] | None = None, *,
                        title: str | None = None) -> go.Figure:
    """Class-mean affinity (row = samples of a class, column = anchor): before, after, difference.

    Rows of classes absent from the audit sample are NaN and render blank.
    """
    cm_before, cm_after = np.asarray(cm_before), np.asarray(cm_after)
    names = _names(class_names, max(cm_before.shape))
    diff = cm_after - cm_before
    lim = float(max(np.nanmax(np.abs(diff), initial=0) if np.isfinite(diff).any() else 0, 1e-6))
    fin = np.concatenate([cm_before[np.isfinite(cm_before)], cm_after[np.isfinite(cm_after)]])
    zmin, zmax = (float(fin.min()), float(fin.max())) if len(fin) else (0.0, 1.0)
    fig = make_subplots(1, 3, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=("original", "unlearned", "difference"))
    common = dict(x=names[:cm_before.shape[1]], y=names[:cm_before.shape[0]],
                  hovertemplate="class %{y} / anchor %{x}: %{z:.3f}<extra></extra>")
    fig.add_trace(go.Heatmap(z=_r(cm_before), zmin=zmin, zmax=zmax, colorscale=PALETTE.sequential, showscale=False,
                             **common), 1, 1)
    fig.add_trace(go.Heatmap(z=_r(cm_after), zmin=zmin, zmax=zmax, colorscale=PALETTE.sequential,
                             colorbar=_hbar("mean affinity", 0.325, 0.6), **common), 1, 2)
    fig.add_trace(go.Heatmap(z=_r(diff), zmin=-lim, zmax=lim, zmid=0, colorscale=PALETTE.diverging,
                             colorbar=_hbar("Δ (blue: lost, red: gained)", 0.85, 0.28), **common), 1, 3)
    fig.update_yaxes(autorange="reversed")
    _layout(fig, title or "Class-mean anchor affinity (rows: samples of a class, columns: class anchors)", 560)
    fig.update_layout(margin=dict(b=150))
    return fig


def row_cosine_histogram(cos: np.ndarray, groups: np.ndarray, *, title: str | None = None) -> go.Figure:
    """Per-sample cosine between affinity rows before and after, one histogram per group."""
    cos, groups = np.asarray(cos, np.float64), np.asarray(groups).astype(str)
    fig = go.Figure()
    lo = float(min(np.nanmin(cos, initial=1.0), 0.9))
    for g in ("retain", "test", "forget"):
        v = cos[groups == g]
        if len(v):
            fig.add_trace(go.Histogram(x=_r(v, 4), name=f"{g} (n={len(v)}, mean {v.mean():.3f})", opacity=0.7,
                                       marker_color=PALETTE.groups[g], histnorm="percent",
                                       xbins=dict(start=lo, end=1.0001, size=(1.0001 - lo) / 50)))
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title="cos(S_ori row, S_unl row)  (1 = affinity structure unchanged)")
    fig.update_yaxes(title="% of group")
    return _layout(fig, title or "Affinity row cosine per sample", 360)


# -------------------------------------------------------------------------------------------- images


def png_data_uri(rgb: np.ndarray, upscale: int = 4) -> str:
    """uint8 [H, W, 3] (or [H, W]) -> data:image/png;base64 URI, upscaled by pixel repetition (crisp at 28x28)."""
    from PIL import Image

    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    if upscale > 1:
        arr = arr.repeat(upscale, 0).repeat(upscale, 1)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def gradcam_gallery(images: np.ndarray, overlay_before: np.ndarray, overlay_after: np.ndarray,
                    captions: Sequence[str], *, sub_before: Sequence[str] | None = None,
                    sub_after: Sequence[str] | None = None, title: str | None = None) -> go.Figure:
    """Grid: one column per image; rows = image, Grad-CAM of the original model, of the unlearned model.

    images [N, C, H, W] in [0, 1]; overlays uint8 [N, H, W, 3] (core.audit.gradcam.overlay).
    Images are embedded as base64 PNG, so the figure is self-contained.
    """
    imgs = np.asarray(images, np.float32)
    n = len(imgs)
    if n == 0:
        return _layout(go.Figure(), title or "Grad-CAM: no images", 200)
    rgb = np.repeat(imgs, 3, 1) if imgs.shape[1] == 1 else imgs
    rgb = (rgb.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    fig = make_subplots(3, n, horizontal_spacing=0.015, vertical_spacing=0.1,
                        row_titles=["image", "original", "unlearned"])
    for i in range(n):
        for r, arr in enumerate((rgb[i], overlay_before[i], overlay_after[i]), start=1):
            fig.add_trace(go.Image(source=png_data_uri(arr), hoverinfo="skip"), r, i + 1)
    h = 3 * max(110, min(170, 1300 // n)) + 200
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    # captions above each column; prediction/probability under the CAM rows
    for i in range(n):
        xa = fig.get_subplot(1, i + 1).xaxis.domain
        ya = fig.get_subplot(1, i + 1).yaxis.domain
        fig.add_annotation(text=captions[i], x=(xa[0] + xa[1]) / 2, y=ya[1] + 0.01, xref="paper", yref="paper",
                           showarrow=False, yanchor="bottom", font=dict(size=10))
        for r, subs, color in ((2, sub_before, PALETTE.before), (3, sub_after, PALETTE.after)):
            if subs:
                yd = fig.get_subplot(r, i + 1).yaxis.domain
                fig.add_annotation(text=subs[i], x=(xa[0] + xa[1]) / 2, y=yd[0] - 0.005, xref="paper", yref="paper",
                                   showarrow=False, yanchor="top", font=dict(size=9, color=color))
    _layout(fig, title or "Grad-CAM before and after (true-label evidence, shared scale per image)", h)
    fig.update_layout(margin=dict(t=100, b=50))
    return fig


# ------------------------------------------------------------------------------------------- metrics


def per_class_accuracy_bars(before: Sequence[float], after: Sequence[float] | None,
                            class_names: Sequence[str] | None = None, *, title: str | None = None) -> go.Figure:
    """Per-class test accuracy (%) of the original and the unlearned model."""
    def arr(v: Sequence[float | None]) -> np.ndarray:  # None = class absent from the test set
        return np.array([np.nan if x is None else x for x in v], dtype=np.float64)

    b = arr(before)
    names = _names(class_names, len(b))
    fig = go.Figure(go.Bar(x=names, y=_r(b, 2), name="original", marker_color=PALETTE.before))
    if after is not None:
        fig.add_trace(go.Bar(x=names, y=_r(arr(after), 2), name="unlearned",
                             marker_color=PALETTE.after))
    fig.update_layout(barmode="group")
    fig.update_yaxes(title="test accuracy (%)", range=[0, 105])
    return _layout(fig, title or "Per-class test accuracy", 380)


def history_curves(history: Sequence[dict], *, polish: dict | None = None, title: str | None = None) -> go.Figure:
    """Loss terms (and total loss) and forget accuracy against the update step.

    `polish` (core.audit.views.polish_record: "from", "until", "returned") shades the steps taken after every
    forget image was first misclassified and marks the step whose weights the run returned: the curves go on past it.
    """
    fig = make_subplots(1, 2, horizontal_spacing=0.08, subplot_titles=("loss terms", "forget accuracy (%)"))
    rows = [h for h in history if isinstance(h, dict) and "step" in h]
    if not rows:
        return _layout(fig, title or "Training history: none recorded", 340)
    steps = np.array([h["step"] for h in rows])
    term_names = sorted({k for h in rows for k in (h.get("terms") or {})})
    seq = qualitative.Dark2
    for i, name in enumerate(term_names):
        fig.add_trace(go.Scatter(x=steps, y=[(h.get("terms") or {}).get(name) for h in rows], mode="lines",
                                 name=name, line=dict(color=seq[i % len(seq)], width=1.5)), 1, 1)
    if any("loss" in h for h in rows):
        fig.add_trace(go.Scatter(x=steps, y=[h.get("loss") for h in rows], mode="lines", name="total loss",
                                 line=dict(color="#333", width=2.5)), 1, 1)
    fa = [h.get("forget_acc") for h in rows]
    fig.add_trace(go.Scatter(x=steps, y=fa, mode="lines+markers", name="forget accuracy",
                             line=dict(color=PALETTE.forget, width=2), marker=dict(size=4)), 1, 2)
    if polish:
        end = int(steps.max())  # after the traces: plotly leaves shapes off subplots that are still empty
        for col in (1, 2):
            fig.add_vrect(x0=polish["from"], x1=end, fillcolor="#999", opacity=0.12, line_width=0, row=1, col=col)
            fig.add_vline(x=polish["returned"], line=dict(color=PALETTE.after, dash="dash", width=1.5),
                          row=1, col=col)
        fig.add_annotation(x=polish["returned"], y=100, xref="x2", yref="y2", xanchor="right", yanchor="top",
                           showarrow=False, text=f"polish steps (shaded); returned: step {polish['returned']} ",
                           font=dict(size=11, color=PALETTE.after))
    fig.update_xaxes(title="step")
    fig.update_yaxes(range=[-3, 103], row=1, col=2)
    return _layout(fig, title or "Unlearning history", 360)


def mia_figure(before: dict | None, after: dict | None, *, title: str | None = None) -> go.Figure:
    """Share of samples the confidence attack calls "member": retain, test and forget, before vs after.

    Inputs are MIAResult.as_dict() (or None when that side is missing). The test bar is
    the attack's false-positive rate: where forget samples should land after unlearning.
    """
    cats = ["retain (members)", "test (non-members)", "forget set"]
    keys = ["member_rate_retain", "member_rate_test", "member_rate_forget"]
    fig = go.Figure()
    for side, res, color in (("original", before, PALETTE.before), ("unlearned", after, PALETTE.after)):
        if res:
            fig.add_trace(go.Bar(x=cats, y=[100 * res[k] for k in keys], name=
                                 f"{side}: attack acc {res['attack_accuracy']:.2f}, AUC {res['auc']:.2f}, "
                                      f"forget AUC {res['forget_auc']:.2f}",
                                 marker_color=color, texttemplate="%{y:.1f}%", textposition="outside"))
    fig.update_layout(barmode="group")
    fig.update_yaxes(title='called "member" (%)', range=[0, 110])
    return _layout(fig, title or "Membership inference (confidence threshold calibrated on retain vs test)", 380)
