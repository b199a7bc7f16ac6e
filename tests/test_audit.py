"""core.audit on real arrays: features, confidences and Grad-CAM of the shipped sample model on Fashion-MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.audit import (
    DriftReducer,
    anchor_similarity,
    calibrate_threshold,
    class_mean_affinity,
    confidence_mia,
    embedding_drift,
    mia_before_after,
    project_snapshots,
    row_cosine,
    row_cosine_summary,
    sample_affinity,
)
from core.audit.mia import MIA_DEFINITION, rank_auc, roc

PER_CLASS = 25


@pytest.fixture(scope="module")
def real(sample_model, fashion) -> dict:
    """Audit-sample-like arrays from the real model: 6 'forget' train images + 25 test images per class."""
    model = sample_model.model.eval()
    g = torch.Generator().manual_seed(0)
    test_rows = torch.cat([torch.nonzero(fashion.test.labels == c).squeeze(1)[
        torch.randperm(int((fashion.test.labels == c).sum()), generator=g)[:PER_CLASS]] for c in range(10)])
    train_rows = torch.randperm(len(fashion.train), generator=g)[:6]
    x = torch.cat([fashion.train.images(train_rows), fashion.test.images(test_rows)])
    y = torch.cat([fashion.train.labels[train_rows], fashion.test.labels[test_rows]])
    with torch.no_grad():
        feats = model.features(x)
        probs = torch.softmax(model.classify(feats), 1)
    # train vs test confidences of the true label, for membership inference
    mem_rows = torch.randperm(len(fashion.train), generator=g)[:400]
    non_rows = torch.randperm(len(fashion.test), generator=g)[:400]
    with torch.no_grad():
        conf_m = torch.softmax(model(fashion.train.images(mem_rows)), 1).gather(
            1, fashion.train.labels[mem_rows][:, None])[:, 0]
        conf_n = torch.softmax(model(fashion.test.images(non_rows)), 1).gather(
            1, fashion.test.labels[non_rows][:, None])[:, 0]
    groups = np.array(["forget"] * 6 + ["test"] * len(test_rows))
    return {"x": x, "y": y.numpy(), "feats": feats.numpy(), "probs": probs.numpy(), "groups": groups,
            "conf_member": conf_m.numpy(), "conf_nonmember": conf_n.numpy(), "model": model}


# ------------------------------------------------------------------------------------------------ drift


@pytest.mark.parametrize("method", ["pca", "umap"])
def test_unchanged_features_do_not_move(real, method):
    res, red = embedding_drift(real["feats"], real["feats"].copy(), real["y"], real["groups"], method=method)
    assert red.method_ == method
    assert res.before.shape == (len(real["y"]), 2)
    assert np.all(res.displacement == 0)
    assert res.summary()["all"]["median"] == 0


@pytest.mark.parametrize("method", ["pca", "umap"])
def test_drift_is_attributed_to_the_class_that_moved(real, method):
    """Replace the Trouser (1) features by Ankle-boot (9) features: only class 1 may move."""
    after = real["feats"].copy()
    src = np.flatnonzero((real["y"] == 9) & (real["groups"] != "forget"))
    dst = np.flatnonzero((real["y"] == 1) & (real["groups"] != "forget"))
    after[dst] = real["feats"][src[: len(dst)]]
    res, _ = embedding_drift(real["feats"], after, real["y"], real["groups"], n_classes=10, method=method)
    med = np.array([r["median"] for r in res.per_class])
    assert np.argmax(med) == 1 and med[1] > 0.5
    others = np.delete(med, 1)
    assert np.all(others == 0)
    # moved next to the boots in the original map
    boots = res.before[(real["y"] == 9) & (real["groups"] != "forget")].mean(0)
    assert np.linalg.norm(res.after[dst].mean(0) - boots) < np.linalg.norm(res.before[dst].mean(0) - boots)


def test_collapse_shrinks_class_spread_in_the_map(real):
    """Features collapsed onto one point (what NegGrad tends towards) must pile up in the map."""
    collapsed = np.repeat(real["feats"].mean(0, keepdims=True), len(real["feats"]), 0)
    collapsed += np.random.default_rng(0).normal(scale=1e-3, size=collapsed.shape).astype(np.float32)
    res, _ = embedding_drift(real["feats"], collapsed, real["y"], real["groups"], method="umap")
    spread_b = np.nanmean([r["spread_before"] for r in res.per_class])
    spread_a = np.nanmean([r["spread_after"] for r in res.per_class])
    assert spread_a < 0.2 * spread_b
    assert np.linalg.norm(res.after - res.after.mean(0), axis=1).max() < 0.2 * np.ptp(res.before, axis=0).max()


def test_absent_class_and_single_forget_point(real):
    keep = real["y"] != 5
    groups = real["groups"][keep].copy()
    assert (groups == "forget").any()
    groups[np.flatnonzero(groups == "forget")[1:]] = "test"  # a forget set of one image
    res, _ = embedding_drift(real["feats"][keep], real["feats"][keep] * 1.1, real["y"][keep], groups,
                             n_classes=10, method="pca")
    row5 = res.per_class[5]
    assert row5["absent"] and row5["n"] == 0 and np.isnan(row5["median"])
    assert not res.per_class[0]["absent"] and res.per_class[0]["median"] > 0
    assert res.summary()["forget"]["n"] == 1
    assert len(res.per_class) == 10


def test_tiny_sample_falls_back_to_pca_and_nonfinite_is_tolerated(real):
    red = DriftReducer("umap").fit(real["feats"][:8])
    assert red.method_ == "pca" and "PCA" in red.note_
    bad = real["feats"][:8].copy()
    bad[0, 0] = np.inf
    bad[1, 1] = np.nan
    assert np.isfinite(red.transform(bad)).all()
    with pytest.raises(ValueError):
        DriftReducer("tsne")


def test_timeline_uses_the_same_map(real):
    res, red = embedding_drift(real["feats"], real["feats"] * 0.5, real["y"], real["groups"], method="umap")
    snaps = np.stack([real["feats"], real["feats"] * 0.5]).astype(np.float16)
    frames = project_snapshots(red, snaps)
    assert frames.shape == (2, len(real["y"]), 2)
    # float16 snapshots land (almost) where the float32 features did
    assert np.median(np.linalg.norm(frames[0] - res.before, axis=1)) < 0.05 * res.scale
    assert np.median(np.linalg.norm(frames[1] - res.after, axis=1)) < 0.05 * res.scale


# --------------------------------------------------------------------------------------------- affinity


@pytest.fixture(scope="module")
def anchors() -> tuple[np.ndarray, np.ndarray]:
    from core.engine import anchor_map

    a = np.random.default_rng(1).normal(size=(10, 384)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a, anchor_map(128, 384, seed=0).numpy()


def test_sample_affinity_matches_the_method_by_hand(real, anchors):
    a, r = anchors
    s = sample_affinity(real["feats"], a, r)
    z = real["feats"].astype(np.float64) @ r
    by_hand = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ a.T  # S = norm(f R) A^T
    np.testing.assert_allclose(s, by_hand, atol=1e-5)
    assert s.shape == (len(real["feats"]), 10) and np.all(np.abs(s) <= 1 + 1e-5)
    with pytest.raises(ValueError):
        sample_affinity(real["feats"], a)  # 128-d features, 384-d anchors, no R


def test_anchor_similarity_and_row_cosine(real, anchors):
    a, r = anchors
    sim = anchor_similarity(a * 3.0)  # re-normalised
    np.testing.assert_allclose(np.diag(sim), 1, atol=1e-6)
    np.testing.assert_allclose(sim, sim.T, atol=1e-6)
    s = sample_affinity(real["feats"], a, r)
    np.testing.assert_allclose(row_cosine(s, s), 1, atol=1e-5)
    shuffled = s[np.random.default_rng(0).permutation(len(s))]
    cos = row_cosine(s, shuffled)
    assert cos.mean() < 0.999
    summ = row_cosine_summary(cos, real["groups"])
    assert summ["forget"]["n"] == 6 and summ["retain"] == {"n": 0}
    assert summ["all"]["mean"] == pytest.approx(float(cos.mean()), abs=1e-6)


def test_class_mean_affinity_absent_class_is_nan(real, anchors):
    a, r = anchors
    s = sample_affinity(real["feats"], a, r)
    keep = real["y"] != 3
    cm = class_mean_affinity(s[keep], real["y"][keep], 10)
    assert cm.shape == (10, 10)
    assert np.isnan(cm[3]).all() and np.isfinite(np.delete(cm, 3, 0)).all()
    np.testing.assert_allclose(cm[0], s[real["y"] == 0].mean(0), atol=1e-6)


# ------------------------------------------------------------------------------------- membership inference


def test_mia_on_real_confidences(real):
    m, n = real["conf_member"], real["conf_nonmember"]
    res_members = confidence_mia(m, n, m[:50])
    res_test = confidence_mia(m, n, n[:50])
    assert 0.45 <= res_members.attack_accuracy <= 1 and 0 <= res_members.auc <= 1
    # forget samples that look like members / like test data get the corresponding rate
    assert res_members.member_rate_forget == pytest.approx(float((m[:50] >= res_members.threshold).mean()))
    assert res_test.member_rate_forget == pytest.approx(float((n[:50] >= res_test.threshold).mean()))
    zero = confidence_mia(m, n, np.zeros(5))
    assert zero.member_rate_forget == 0.0 and zero.n_forget == 5
    # the forget AUC: test samples as forget samples score one half; never-confident ones score 0
    assert confidence_mia(m, n, n).forget_auc == pytest.approx(0.5)
    assert zero.forget_auc == 0.0 and confidence_mia(m, n, np.ones(3)).forget_auc > 0.9


def test_forget_auc_is_the_threshold_free_area_and_steady_where_the_rate_jumps():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    for trial in range(10):  # rounded scores: ties inside and across the groups count one half, as in sklearn
        f, n = np.round(rng.beta(2 + trial, 2, 40), 2), np.round(rng.beta(3, 2, 500), 2)
        expected = roc_auc_score(np.r_[np.ones(len(f)), np.zeros(len(n))], np.r_[f, n])
        assert rank_auc(f, n) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(rank_auc(np.array([]), np.array([0.5])))
    # a well-generalising model: members and non-members alike, so a sample or two decides where the threshold
    # falls. Forget samples between the two modes are called members at rate 0 or 1 with it; the AUC stays one half
    members, nonmembers = np.r_[np.full(50, 0.2), np.full(52, 0.9)], np.r_[np.full(50, 0.2), np.full(50, 0.9)]
    forget = np.full(8, 0.5)
    low = confidence_mia(members, nonmembers, forget)  # the threshold lands on 0.9
    high = confidence_mia(members[:100], np.r_[0.1, 0.1, nonmembers[2:]], forget)  # on 0.2
    assert (low.member_rate_forget, high.member_rate_forget) == (0.0, 1.0)
    assert low.forget_auc == high.forget_auc == 0.5


def test_mia_threshold_separates_separable_scores():
    t, acc, auc = calibrate_threshold(np.array([0.9, 0.95, 0.99]), np.array([0.1, 0.2, 0.3]))
    assert 0.3 < t <= 0.9 and acc == 1.0 and auc == 1.0
    with pytest.raises(ValueError):
        calibrate_threshold(np.array([]), np.array([0.5]))


def test_roc_and_calibration_match_scikit_learn():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    for trial in range(20):
        # rounded scores: many ties, within and across the two groups, as softmax confidences of 1.0 give
        m = np.round(rng.beta(5, 1 + trial % 3, 300), 2)
        n = np.round(rng.beta(3, 2, 200 + 10 * trial), 2)
        y, s = np.r_[np.ones(len(m)), np.zeros(len(n))], np.r_[m, n]
        fpr, tpr, thr = roc(y, s)
        ref_fpr, ref_tpr, ref_thr = roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_array_equal(thr, ref_thr)
        np.testing.assert_allclose(fpr, ref_fpr, atol=1e-15)
        np.testing.assert_allclose(tpr, ref_tpr, atol=1e-15)
        t, acc, auc = calibrate_threshold(m, n)
        j = np.argmax(ref_tpr - ref_fpr)
        assert t == ref_thr[j] and acc == pytest.approx((ref_tpr[j] + 1 - ref_fpr[j]) / 2, abs=1e-12)
        assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # every score the same: no threshold separates anything, the area is one half
    t, acc, auc = calibrate_threshold(np.full(4, 0.5), np.full(3, 0.5))
    assert acc == 0.5 and auc == 0.5 and t > 0.5


def test_mia_before_after_from_audit_arrays(real):
    m, n = real["conf_member"], real["conf_nonmember"]
    conf = real["probs"][np.arange(len(real["y"])), real["y"]]
    audit = {"group": real["groups"], "conf_before": conf, "conf_after": np.zeros_like(conf),
             "retain_conf_before": m, "test_conf_before": n, "retain_conf_after": m, "test_conf_after": n}
    res = mia_before_after(audit)
    assert set(res) == {"before", "after"} and res["before"].n_forget == 6
    assert res["after"].member_rate_forget == 0.0
    del audit["retain_conf_after"]
    assert set(mia_before_after(audit)) == {"before"}
    assert "threshold" in MIA_DEFINITION and "retain" in MIA_DEFINITION and "test" in MIA_DEFINITION


# ---------------------------------------------------------------------------------------------- Grad-CAM


def test_gradcam_real_model(real):
    from core.audit.gradcam import grad_cam

    model = real["model"]
    x, y = real["x"][6:16], real["y"][6:16]
    res = grad_cam(model, x, y, batch_size=4)
    assert res.cams.shape == (10, 28, 28) and np.isfinite(res.cams).all() and (res.cams >= 0).all()
    assert all(res.cams[i].std() > 0 for i in range(10))
    one = grad_cam(model, x, y, batch_size=10)
    np.testing.assert_allclose(res.cams, one.cams, rtol=1e-4, atol=1e-5)  # batching changes nothing
    # the evidence sits on the garment, not on the black background
    fg = x[:, 0].numpy() > 0.1
    on = np.array([res.cams[i][fg[i]].mean() for i in range(10)])
    off = np.array([res.cams[i][~fg[i]].mean() if (~fg[i]).any() else 0 for i in range(10)])
    assert np.median(on) > np.median(off)
    np.testing.assert_array_equal(res.target, y)
    assert (res.pred == y).mean() >= 0.7 and np.all((res.prob_target > 0) & (res.prob_target <= 1))
    other = grad_cam(model, x, (y + 1) % 10, batch_size=10)
    assert not np.allclose(other.cams, one.cams)


def test_gradcam_keeps_model_state_and_supports_unlearned_wrapper(real):
    from core.audit.gradcam import grad_cam_before_after, last_conv_stage, overlay
    from core.engine import UnlearnedModel

    model = real["model"]
    wrapped = UnlearnedModel(model)
    assert last_conv_stage(wrapped) is model.layer4
    stats = model.bn1.running_mean.clone()
    model.train()
    try:
        b, a = grad_cam_before_after(model, wrapped, real["x"][6:10], real["y"][6:10])
        assert model.training
    finally:
        model.eval()
    assert torch.equal(stats, model.bn1.running_mean)
    np.testing.assert_allclose(b.cams, a.cams, atol=1e-5)  # same weights -> same maps
    assert np.allclose(b.cams.reshape(4, -1).max(1), 1.0)
    ov = overlay(real["x"][6:10], b.cams)
    assert ov.shape == (4, 28, 28, 3) and ov.dtype == np.uint8
    plain = overlay(real["x"][6:10], np.zeros((4, 28, 28)))
    np.testing.assert_array_equal(plain[..., 0], (real["x"][6:10, 0].numpy() * 255).round().astype(np.uint8))


def test_forget_auc_caption_names_each_model_it_has():
    from core.audit.views import forget_auc_caption

    m, n = np.r_[np.full(10, 0.9), 0.2], np.full(10, 0.9)
    mia = {"before": confidence_mia(m, n, n[:4]), "after": confidence_mia(m, n, np.zeros(4))}
    text = forget_auc_caption(mia, {"metrics": {"retrain": {"mia_forget_auc": {"retrain": 0.47, "unlearned": 0.0}}}})
    assert text.endswith("original 0.50, unlearned 0.00, retrained 0.47.")
    assert forget_auc_caption({"after": mia["after"]}, {"metrics": {}}).endswith(": unlearned 0.00.")
    assert forget_auc_caption({}, {}) is None
