"""core.figures: pure builders fed with real audit arrays of the sample model; checks what each figure encodes."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from core import figures as F
from core.audit import (
    anchor_similarity,
    class_mean_affinity,
    confidence_mia,
    embedding_drift,
    row_cosine,
    sample_affinity,
)
from core.figures import PALETTE, class_color

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def arrays(sample_model, fashion) -> dict:
    model = sample_model.model.eval()
    g = torch.Generator().manual_seed(3)
    rows = torch.cat([torch.nonzero(fashion.test.labels == c).squeeze(1)[:20] for c in range(10)])
    f_rows = torch.randperm(len(fashion.train), generator=g)[:4]
    x = torch.cat([fashion.train.images(f_rows), fashion.test.images(rows)])
    y = torch.cat([fashion.train.labels[f_rows], fashion.test.labels[rows]]).numpy()
    with torch.no_grad():
        fb = model.features(x).numpy()
    groups = np.array(["forget"] * 4 + ["retain", "test"] * 100)
    # an "after" in which the forget features have been replaced by other samples' features
    fa = fb.copy()
    fa[:4] = fb[-4:]
    a = np.random.default_rng(0).normal(size=(10, 128)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    drift, red = embedding_drift(fb, fa, y, groups, n_classes=10, method="pca")
    return {"x": x.numpy(), "y": y, "groups": groups, "fb": fb, "fa": fa, "anchors": a, "drift": drift,
            "reducer": red, "s_ori": sample_affinity(fb, a), "s_unl": sample_affinity(fa, a)}


def _colors_by_name(fig: go.Figure) -> dict[str, str]:
    return {t.name: t.marker.color for t in fig.data if isinstance(t, go.Scatter) and t.mode == "markers"
            and isinstance(t.marker.color, str)}


def test_palette_is_one_source_of_truth():
    assert len(set(PALETTE.classes)) == 10 and PALETTE.forget not in PALETTE.classes
    assert PALETTE.before != PALETTE.after
    assert class_color(3) == PALETTE.classes[3]
    assert len({class_color(c, 100) for c in range(100)}) > 50  # many classes still get distinct colours


def test_drift_scatter(arrays):
    d = arrays["drift"]
    fig = F.drift_scatter(d.before, d.after, arrays["y"], arrays["groups"], NAMES, method=d.method)
    forget = [t for t in fig.data if t.name == "forget set"]
    assert len(forget) == 2 and all(t.marker.symbol == PALETTE.forget_symbol for t in forget)
    assert all(t.marker.line.color == PALETTE.forget for t in forget)
    np.testing.assert_allclose(np.c_[forget[1].x, forget[1].y], np.round(d.after[:4], 3))
    seg = next(t for t in fig.data if t.name == "displacement")
    assert len(seg.x) == 3 * 200 and seg.x[2] is None  # one None-separated segment per non-forget sample
    assert _colors_by_name(fig)["Trouser"] == class_color(1)
    assert sum(t.name == "Trouser" for t in fig.data) == 2 and fig.layout.xaxis.range == fig.layout.xaxis2.range
    json.loads(fig.to_json())


def test_drift_class_bars_marks_absent_classes(arrays):
    rows = [dict(r) for r in arrays["drift"].per_class]
    rows[5].update(absent=True, n=0, median=float("nan"))
    fig = F.drift_class_bars(rows, NAMES, forget_median=1.5)
    bar = fig.data[0]
    assert bar.y[5] is None and "absent" in bar.text[5]
    assert list(bar.marker.color) == [class_color(c) for c in range(10)]
    assert any("forget set median 1.50" in a.text for a in fig.layout.annotations)


def test_timeline_frames_slider_and_fixed_axes(arrays):
    red, fb = arrays["reducer"], arrays["fb"]
    snaps = np.stack([fb, fb * 0.7, fb * 0.2 + fb.mean(0) * 0.8]).astype(np.float16)
    from core.audit import project_snapshots

    frames = project_snapshots(red, snaps)
    fig = F.drift_timeline(frames, [0, 5, 10], arrays["y"], arrays["groups"], NAMES,
                           frame_notes=["forget accuracy 100%", "50%", "0%"])
    assert len(fig.frames) == 3 and [f.name for f in fig.frames] == ["step 0", "step 5", "step 10"]
    assert len(fig.layout.sliders[0].steps) == 3 and fig.layout.updatemenus[0].buttons[0].label == "Play"
    n_tr = {len(f.data) for f in fig.frames}
    assert n_tr == {len(fig.data)} and len(fig.data) == 11  # 10 classes + forget set
    last = fig.frames[2].data[-1]
    np.testing.assert_allclose(np.c_[last.x, last.y], np.round(frames[2][:4], 3))
    assert fig.layout.xaxis.autorange is False and fig.layout.xaxis.range is not None
    lo, hi = fig.layout.xaxis.range
    inside = (frames[..., 0] >= lo) & (frames[..., 0] <= hi)
    assert inside.mean() > 0.98  # ranges cover all frames, not just the first
    assert "0%" in fig.frames[2].layout.title.text
    with_orig = F.drift_timeline(frames, [0, 5, 10], arrays["y"], arrays["groups"], NAMES,
                                 before_xy=arrays["drift"].before)
    assert len(with_orig.frames) == 4 and with_orig.frames[0].name == "original"
    assert _colors_by_name(fig)["Bag"] == class_color(8)


def test_affinity_heatmaps(arrays):
    s_ori, s_unl = arrays["s_ori"], arrays["s_unl"]
    fig = F.affinity_heatmaps(s_ori, s_unl, arrays["y"], arrays["groups"], NAMES, max_rows=60)
    h_ori, h_unl, h_diff = fig.data
    assert np.asarray(h_diff.z).shape == (60, 10)
    assert h_diff.zmid == 0 and h_diff.zmin == -h_diff.zmax
    assert h_ori.zmin == h_unl.zmin and h_ori.zmax == h_unl.zmax  # same scale for before and after
    assert all(lbl.startswith("F ") for lbl in h_ori.y[:4]) and not h_ori.y[4].startswith("F ")
    np.testing.assert_allclose(np.asarray(h_diff.z)[:4], np.round(s_unl[:4] - s_ori[:4], 3), atol=2e-3)
    sim = F.anchor_similarity_heatmap(anchor_similarity(arrays["anchors"]), NAMES)
    np.testing.assert_allclose(np.diag(np.asarray(sim.data[0].z)), 1, atol=1e-3)


def test_class_mean_heatmaps_with_absent_class(arrays):
    y = arrays["y"]
    keep = y != 7
    cb = class_mean_affinity(arrays["s_ori"][keep], y[keep], 10)
    ca = class_mean_affinity(arrays["s_unl"][keep], y[keep], 10)
    fig = F.class_mean_heatmaps(cb, ca, NAMES)
    z = np.asarray(fig.data[2].z, dtype=float)
    assert np.isnan(z[7]).all() and np.isfinite(np.delete(z, 7, 0)).all()
    json.loads(fig.to_json())  # NaN must serialise (as null)


def test_row_cosine_histogram(arrays):
    cos = row_cosine(arrays["s_ori"], arrays["s_unl"])
    fig = F.row_cosine_histogram(cos, arrays["groups"])
    names = [t.name.split(" ")[0] for t in fig.data]
    assert names == ["retain", "test", "forget"]
    assert fig.data[2].marker.color == PALETTE.groups["forget"]
    assert len(fig.data[2].x) == 4


def test_gradcam_gallery_embeds_images(arrays):
    from core.audit.gradcam import overlay

    imgs = arrays["x"][:3]
    cams = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    fig = F.gradcam_gallery(imgs, overlay(imgs, cams), overlay(imgs, cams * 0), ["a", "b", "c"],
                            sub_before=["p1"] * 3, sub_after=["p2"] * 3)
    srcs = [t.source for t in fig.data]
    assert len(srcs) == 9 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert srcs[1] != srcs[2]  # image row vs original-model CAM row
    texts = [a.text for a in fig.layout.annotations]
    assert {"a", "b", "c", "p1", "p2"} <= set(texts)
    assert F.gradcam_gallery(imgs[:0], imgs[:0], imgs[:0], []).layout.title.text.startswith("Grad-CAM: no")


def test_metric_figures(arrays):
    bars = F.per_class_accuracy_bars([90.0] * 10, [80.0] * 9 + [None], NAMES)
    assert bars.data[0].marker.color == PALETTE.before and bars.data[1].marker.color == PALETTE.after
    assert np.isnan(np.asarray(bars.data[1].y, dtype=float)[9])
    hist = [{"step": 0, "loss": None, "terms": {}, "forget_acc": 100.0}] + [
        {"step": i, "loss": -float(i), "terms": {"del": -float(i), "align": 0.1}, "forget_acc": 100.0 - 25 * i}
        for i in range(1, 5)]
    fig = F.history_curves(hist)
    assert [t.name for t in fig.data] == ["align", "del", "total loss", "forget accuracy"]
    assert list(fig.data[-1].y) == [100.0, 75.0, 50.0, 25.0, 0.0]
    assert "none recorded" in F.history_curves([]).layout.title.text
    assert not fig.layout.shapes
    polished = F.history_curves(hist, polish={"from": 2, "until": 6, "returned": 3, "pick": "mix_kl"})
    shapes = polished.layout.shapes  # the polish window and the returned step, on both panels
    assert sorted((sh.type, sh.x0) for sh in shapes) == [("line", 3), ("line", 3), ("rect", 2), ("rect", 2)]
    assert [sh.x1 for sh in shapes if sh.type == "rect"] == [4, 4]  # to the last recorded step
    assert any(a.text.strip().endswith("returned: step 3") for a in polished.layout.annotations)
    m, n = arrays["s_ori"].max(1), arrays["s_unl"].max(1)
    res = confidence_mia(m, n, m[:4]).as_dict()
    mia = F.mia_figure(res, None)
    assert len(mia.data) == 1 and mia.data[0].marker.color == PALETTE.before
    assert mia.data[0].y[2] == pytest.approx(100 * res["member_rate_forget"])
