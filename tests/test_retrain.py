"""The retrain reference: the base recipe trained without the forget set, found by forget set, and
compared with an unlearned model in the run record (gaps, Tug-of-War, MIA).

Training is real but short: the recipe read from the card is cut to one epoch and the data are a
few hundred real Fashion-MNIST images, so the file stays quick on a 2-core CPU.
"""

from __future__ import annotations

import html
import json
import shutil

import numpy as np
import pytest
import torch

from bench.backfill_mia_auc import backfill
from core.audit.mia import mia_before_after
from core.audit.views import TOW_DEFINITION
from core.cli_bench import bench_row
from core.data import Dataset
from core.models import LoadedModel, load_model
from core.pipeline import RunRequest, execute_run, tug_of_war
from core.report import build_report
from core.retrain import find_retrained, ids_hash, recipe_of, retrain, save_retrained

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def small_data(bundled_fashion) -> Dataset:
    """400 real training images (40 per class) and the bundled test subset."""
    ds = bundled_fashion
    pos = torch.cat([torch.nonzero(ds.train.labels == c).squeeze(1)[:40] for c in range(10)]).sort().values
    return Dataset(ds.name, ds.class_names, ds.train.subset(pos), ds.test, ds.source, ds.source_kind, False)


@pytest.fixture(scope="module")
def short_base(sample_model) -> LoadedModel:
    """The sample model with its recorded recipe cut to one epoch."""
    card = json.loads(json.dumps(sample_model.card))
    card["training"]["config"]["epochs"] = 1
    return LoadedModel(sample_model.model, card, sample_model.path)


def test_ids_hash_is_order_free():
    assert ids_hash([3, 1, 2]) == ids_hash([1, 2, 3]) != ids_hash([1, 2, 4])


def test_recipe_is_read_from_the_card(sample_model):
    cfg = recipe_of(sample_model.card)
    assert (cfg.arch, cfg.epochs, cfg.lr, cfg.seed) == ("resnet18_narrow", 12, 0.1, 0)


def test_retrain_leaves_the_forget_set_out_and_is_found(small_data, short_base, tmp_path):
    forget = small_data.train.ids[[0, 5, 17]].tolist()
    model, card = retrain(small_data, short_base, forget, torch.device("cpu"), progress=False)
    assert card["forget_ids"] == sorted(forget) and card["forget_ids_sha256"] == ids_hash(forget)
    assert card["trained_on"].startswith(f"fashion-mnist train minus 3 forget ids, {len(small_data.train) - 3} images")
    assert card["retrain_of"]["weights_sha256"] == short_base.card["weights_sha256"]
    assert card["training"]["config"]["epochs"] == 1 and card["training"]["seconds"] > 0
    saved = save_retrained(model, card, tmp_path / "refs" / "k3")
    assert len(saved["weights_sha256"]) == 64
    found = find_retrained(short_base.card, list(reversed(forget)), tmp_path / "refs")
    assert found == tmp_path / "refs" / "k3.json"
    assert find_retrained(short_base.card, forget[:2], tmp_path / "refs") is None
    other = dict(short_base.card, weights_sha256="0" * 64)
    assert find_retrained(other, forget, tmp_path / "refs") is None
    reloaded = load_model(found)
    for a, b in zip(reloaded.model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b.cpu())


def test_retrain_refuses_unknown_ids(small_data, short_base):
    with pytest.raises(Exception, match="not in"):
        retrain(small_data, short_base, [10**7], torch.device("cpu"), progress=False)


def test_cli_retrain(run_cli, write_idx_dir, sample_model, tmp_path):
    base = tmp_path / "base"
    card = json.loads(json.dumps(sample_model.card))
    card["training"]["config"]["epochs"] = 1
    card["weights_file"] = "base.safetensors"
    base.with_suffix(".json").write_text(json.dumps(card))
    shutil.copy(sample_model.path, base.with_suffix(".safetensors"))
    ids = tmp_path / "ids.json"
    ids.write_text("[0, 1, 2, 3]")
    data = write_idx_dir(n_train=60, n_test=20)
    out = tmp_path / "refs" / "mine"
    proc = run_cli("retrain", "--model", str(base.with_suffix(".json")), "--ids", str(ids), "--data-dir", str(data),
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "4 ids left out" in proc.stdout
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["forget_ids"] == [0, 1, 2, 3] and "retrain --model" in saved["training"]["command"]
    assert "56 images" in saved["trained_on"]
    proc = run_cli("retrain", "--ids", str(ids), "--k", "3")
    assert proc.returncode == 2 and "--ids FILE or --k K" in proc.stderr


def test_tug_of_war_by_hand():
    ref = {"forget_acc": 90.0, "retain_acc": 95.0, "test_acc": 93.0}
    assert tug_of_war(ref, ref) == 1.0
    run = {"forget_acc": 0.0, "retain_acc": 85.0, "test_acc": 83.0}
    assert tug_of_war(run, ref) == pytest.approx(0.1 * 0.9 * 0.9)


def test_run_record_compares_with_a_retrained_reference(sample_model, tmp_path, monkeypatch, bundled_fashion):
    """A reference found for the run's exact forget set is evaluated on the same rows and compared.

    The "retrained" model here is the original's weights under a retrain card, so its numbers must
    equal the run's before-metrics exactly: that pins the rows, the gaps and the Tug-of-War score.
    """
    forget = bundled_fashion.train.ids[[3, 50, 700, 1400]].tolist()
    refs = tmp_path / "refs"
    card = {k: v for k, v in sample_model.card.items() if k not in ("training", "weights_file", "weights_sha256")}
    card.update(kind="retrain", forget_ids=sorted(forget), forget_ids_sha256=ids_hash(forget),
                retrain_of={"weights_sha256": sample_model.card["weights_sha256"]},
                training={"command": "python -m core retrain (test stand-in)"})
    save_retrained(sample_model.model, card, refs / "same")
    monkeypatch.setenv("STRUCTGUARD_RETRAIN_DIR", str(refs))
    request = RunRequest(forget_ids=forget, method="adv", runs_root=str(tmp_path / "runs"), retain_eval=200,
                         audit_per_class=2, encoder="minilm",
                         config={"pgd_iters": 2, "n_adv": 2, "max_epochs": 2})
    run_dir = execute_run(request)
    meta = json.loads((run_dir / "run.json").read_text())
    ref, before, after = meta["metrics"]["retrain"], meta["metrics"]["before"], meta["metrics"]["after"]
    for key in ("forget_acc", "retain_acc", "test_acc"):
        assert ref[key] == pytest.approx(before[key]), key
        assert ref["gap"][key] == pytest.approx(after[key] - before[key]), key
    assert ref["tug_of_war"] == pytest.approx(tug_of_war(after, before))
    assert ref["card"].endswith("same.json") and "retrain" in ref["command"]
    rates = ref["mia_forget_member_rate"]
    assert 0 <= rates["retrain"] <= 1 and 0 <= rates["unlearned"] <= 1
    # the stand-in is the original model: its forget AUC is the original's on the audit page, the unlearned one's
    # is the run's own; both computed from the same rows
    audit_mia = mia_before_after(dict(np.load(run_dir / "audit.npz")))
    aucs = ref["mia_forget_auc"]
    assert aucs["retrain"] == pytest.approx(audit_mia["before"].forget_auc)
    assert aucs["unlearned"] == pytest.approx(audit_mia["after"].forget_auc)
    # the report shows the reference: its card, the score, and why forgetting every image scores low
    page = build_report(run_dir, gradcam=False).path.read_text()
    assert "same.json" in page and f"Tug-of-War score {ref['tug_of_war']:.3f}" in page
    assert f"forget AUC vs test (0.5: like unseen data): unlearned {aucs['unlearned']:.3f}" in page
    # bench/backfill_mia_auc.py measures a saved run again: it repeats the row, then adds the AUC; else leaves it
    row = bench_row(run_dir, "adv")
    assert row.pop("mia_auc") == aucs
    assert backfill(row) == "filled" and row["mia_auc"] == pytest.approx(aucs)
    row.pop("mia_auc")
    row["test_acc"] += 1.0
    assert backfill(row).startswith("differs") and "mia_auc" not in row
    assert html.escape(TOW_DEFINITION, quote=False) in page
