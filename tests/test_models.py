"""core.models: registry, shapes and the features/classify split, checkpoints, the sample model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core import models
from core.engine import entering_at
from core.models import (
    ARCHS,
    SAMPLE_MODELS,
    STAGES,
    ModelError,
    compute_dtype,
    conv_bn,
    create_model,
    freeze_before,
    list_models,
    list_sample_models,
    load_checkpoint_for,
    load_model,
    native_bf16,
    read_state_dict,
    save_model,
    sha256_file,
    trunk_dtype,
)
from core.train import accuracy, prepare_model

FEATURE_DIMS = {"resnet18": 512, "resnet18_narrow": 128, "resnet34": 512, "resnet50": 2048}
# The sample model reaches about 92-93% on the full test set; a broken or untrained model gets ~10%.
SUBSET_ACCURACY_FLOOR = 85.0


def _card(arch: str = "resnet18_narrow", classes: int = 10, channels: int = 1) -> dict:
    return {"arch": arch, "dataset": "fashion-mnist", "class_names": [f"c{i}" for i in range(classes)],
            "input_shape": [channels, 28, 28], "mean": [0.5], "std": [0.5]}


def test_registry_lists_the_paper_model_and_the_cpu_variant() -> None:
    assert {"resnet18", "resnet18_narrow"} <= set(list_models())
    assert list_models() == sorted(ARCHS)
    with pytest.raises(ModelError, match="unknown architecture 'vgg'"):
        create_model("vgg", 10)


@pytest.mark.parametrize("arch", sorted(FEATURE_DIMS))
def test_shapes_and_features_classify_split(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=1).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        fmap = model.feature_map(x)
        feats = model.features(x)
        logits = model.classify(feats)
        out = model(x)
    assert model.feature_dim == FEATURE_DIMS[arch]
    assert fmap.shape == (2, FEATURE_DIMS[arch], 4, 4)  # 28 -> 28, 14, 7, 4 with the CIFAR stem
    assert feats.shape == (2, FEATURE_DIMS[arch])
    assert logits.shape == out.shape == (2, 10)
    torch.testing.assert_close(out, logits)
    assert model.linear.in_features == FEATURE_DIMS[arch]


def test_rgb_input_and_cifar_stem() -> None:
    model = create_model("resnet18_narrow", num_classes=100, in_channels=3, mean=(0.5, 0.4, 0.3)).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.mean.shape == (1, 3, 1, 1) and model.mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])
    with torch.no_grad():
        assert model(torch.rand(3, 3, 32, 32)).shape == (3, 100)


def test_normalisation_is_inside_the_model(tiny_model) -> None:
    """Inputs are [0, 1] pixels; the first conv sees (x - mean) / std."""
    x = torch.rand(1, 1, 28, 28)
    seen: dict[str, torch.Tensor] = {}

    def keep_input(module, inputs, output) -> None:
        seen["x"] = inputs[0]

    hook = tiny_model.conv1.register_forward_hook(keep_input)
    tiny_model.train()  # in eval mode the conv runs folded with its BatchNorm (conv_bn), not as a module call
    try:
        with torch.no_grad():
            tiny_model(torch.cat([x, x]))
    finally:
        hook.remove()
        tiny_model.eval()
    torch.testing.assert_close(seen["x"][:1], (x - 0.5) / 0.5)
    assert "mean" in tiny_model.state_dict() and "std" in tiny_model.state_dict()
    with torch.no_grad():  # and the eval-mode stem sees the same normalised input
        stem = F.relu(tiny_model.bn1(tiny_model.conv1((x - 0.5) / 0.5)))
        torch.testing.assert_close(tiny_model._stem(x), stem)


def test_eval_mode_batchnorm_folds_into_the_conv_with_the_same_outputs_and_gradients() -> None:
    """conv_bn in eval mode computes bn(conv(x)) as one convolution; outputs and the gradients to the conv weight and
    BatchNorm's affine are those of the two modules (float64), and train mode still uses the batch's statistics."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, 2, 1, bias=False).double(), nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.normal_(), bn.bias.normal_()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    bn.eval()
    grads = []
    for fn in (lambda: bn(conv(x)), lambda: conv_bn(conv, bn, x)):
        out = fn()
        g = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                (conv.weight, bn.weight, bn.bias))
        grads.append((out.detach(), *g))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    bn.train()
    stats = bn.running_mean.clone()
    torch.testing.assert_close(conv_bn(conv, bn, x), F.batch_norm(conv(x), None, None, bn.weight, bn.bias, True))
    assert not torch.equal(bn.running_mean, stats)  # a train-mode call updates the running statistics as before


def test_small_map_weight_gradient_matches_onednn_to_bfloat16_rounding(monkeypatch) -> None:
    """In bfloat16 on the CPU, layer4's 3x3 convolutions (4x4 output maps) take their weight gradient from a forward
    convolution (core.models.SMALL_MAP): the outputs and the input gradient are oneDNN's bit for bit, the weight and
    BatchNorm gradients are the same sums rounded otherwise. Float32 and the larger maps keep oneDNN's throughout."""
    torch.manual_seed(0)
    model = prepare_model(create_model("resnet18_narrow", 10, 1).eval(), torch.device("cpu"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0), m.weight.normal_(1, 0.1)
    x = torch.rand(48, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    target = torch.randint(10, (48,))

    def step(small_map: int, dtype: torch.dtype | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setattr(models, "SMALL_MAP", small_map)
        model.zero_grad(set_to_none=True)
        z = model.encode(x, "layer3").detach().requires_grad_()
        with entering_at("layer3", model), trunk_dtype(dtype):
            logits = model(z)
        F.cross_entropy(logits, target).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads | {"input": z.grad.clone()}

    small_map = models.SMALL_MAP
    for dtype in (None, torch.bfloat16):
        (out_a, ga), (out_b, gb) = step(0, dtype), step(small_map, dtype)
        assert torch.equal(out_a, out_b)
        differ = {n for n in ga if not torch.equal(ga[n], gb[n])}
        if dtype is None:
            assert not differ
            continue
        assert differ and all(n.startswith("layer4.") and "shortcut" not in n for n in differ), differ
        for n in differ:  # rounding: within a few bfloat16 ulps of the largest entry
            scale = ga[n].abs().max()
            assert (ga[n] - gb[n]).abs().max() <= 0.02 * scale, n


def test_channels_last_gives_the_same_outputs(tiny_model) -> None:
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        ref = tiny_model(x)
        fast = prepare_model(tiny_model, torch.device("cpu"))(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(ref, fast, rtol=1e-4, atol=1e-4)


def test_trunk_dtype_runs_the_convolutions_in_bfloat16_and_returns_float32(tiny_model) -> None:
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        ref = tiny_model.features(x)
        with trunk_dtype(torch.bfloat16):
            half = tiny_model.features(x)
            logits = tiny_model(x)
        again = tiny_model.features(x)
    assert half.dtype == logits.dtype == torch.float32  # the head and everything after it stay float32
    assert not torch.equal(half, ref)  # the trunk did compute in bfloat16 ...
    torch.testing.assert_close(half, ref, rtol=0.05, atol=0.05)  # ... to bfloat16's precision
    assert torch.equal(again, ref)  # and float32 again after the block
    xg = x.clone().requires_grad_(True)
    with trunk_dtype(torch.bfloat16):
        tiny_model(xg).sum().backward()  # attacks and update steps differentiate through it
    assert xg.grad.dtype == torch.float32 and torch.isfinite(xg.grad).all()


def test_compute_dtype_resolves_each_precision() -> None:
    cpu = torch.device("cpu")
    assert compute_dtype("fp32", cpu) is None and compute_dtype("bf16", cpu) == torch.bfloat16
    assert compute_dtype("auto", cpu) == (torch.bfloat16 if native_bf16(cpu) else None)
    assert native_bf16(torch.device("meta")) is False
    with pytest.raises(ModelError, match="choose one of auto, fp32, bf16"):
        compute_dtype("fp16", cpu)


@pytest.mark.parametrize("stage", STAGES)
def test_inputs_entering_at_a_stage_give_the_same_outputs(tiny_model, stage: str) -> None:
    """encode(x, stage) runs the stages before `stage`; entering there gives the full model's outputs."""
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        ref_logits, ref_feats = tiny_model(x), tiny_model.features(x)
        z = tiny_model.encode(x, stage)
        with entering_at(stage, tiny_model):
            logits, feats = tiny_model(z), tiny_model.features(z)
        assert tiny_model.entry == "stem"  # images again after the block
        torch.testing.assert_close(tiny_model(x), ref_logits)
    if stage != "stem":
        assert z.shape[1:] != x.shape[1:]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("arch", "by_conv"), [("resnet18_narrow", ["layer2", "layer3", "layer4"]),
                                             ("resnet50", ["layer1", "layer2", "layer3", "layer4"])])
def test_inputs_stored_in_bfloat16_where_convolutions_take_them_give_the_same_outputs_and_gradients(
        arch: str, by_conv: list[str]) -> None:
    """enters_by_convolution: the stages whose inputs only reach convolutions, which autocast casts to bfloat16
    anyway; there a bfloat16 copy of the input gives bit-identical outputs and weight gradients (the update steps
    keep such copies, core.engine.run_unlearning). Elsewhere it would not, and the stage says so."""
    torch.manual_seed(0)
    model = create_model(arch, 10, 1).eval()
    x = torch.rand(6, 1, 28, 28)
    assert [s for s in STAGES if model.enters_by_convolution(s)] == by_conv  # resnet18's layer1 adds its input
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        with torch.no_grad():
            z = model.encode(x, stage)
        outs = []
        with entering_at(stage, model), trunk_dtype(torch.bfloat16):
            for inp in (z, z.to(torch.bfloat16)):
                model.zero_grad(set_to_none=True)
                logits = model(inp)
                logits.square().sum().backward()
                outs.append((logits.detach(), model.linear.weight.grad.clone(),
                             model.layer4[-1].conv1.weight.grad.clone()))
        same = all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
        assert same == model.enters_by_convolution(stage), stage


def test_freeze_before_stops_gradients_at_the_stage() -> None:
    m = create_model("resnet18_narrow", 10, 1)
    freeze_before(m, "layer4")
    frozen = {n.split(".")[0] for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1", "layer2", "layer3"}
    with pytest.raises(ModelError, match="unknown stage"):
        freeze_before(m, "layer9")


# ------------------------------------------------------------------------ checkpoints


def test_safetensors_round_trip(tiny_model, tmp_path: Path) -> None:
    card = save_model(tiny_model, tmp_path / "m", dict(_card(), test_accuracy=12.5))
    weights, card_file = tmp_path / "m.safetensors", tmp_path / "m.json"
    assert weights.is_file() and card_file.is_file()
    assert card["weights_sha256"] == sha256_file(weights)
    assert json.loads(card_file.read_text())["weights_file"] == "m.safetensors"
    loaded = load_model(tmp_path / "m.json")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), tiny_model(x))
    assert not loaded.model.training
    assert load_model(tmp_path / "m").card["test_accuracy"] == 12.5  # by base path as well


def test_changed_weights_fail_the_sha256_check(tiny_model, tmp_path: Path) -> None:
    save_model(tiny_model, tmp_path / "m", _card())
    other = create_model("resnet18_narrow", 10, 1)
    save_model(other, tmp_path / "other", _card())
    (tmp_path / "m.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(ModelError, match="does not match the sha256"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("wrap", ["plain", "state_dict_key", "data_parallel"])
def test_pt_round_trip_with_weights_only(tiny_model, tmp_path: Path, wrap: str) -> None:
    state = tiny_model.state_dict()
    if wrap == "state_dict_key":
        state = {"state_dict": state}
    elif wrap == "data_parallel":
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state, tmp_path / "ckpt.pt")
    model = load_checkpoint_for(_card(), tmp_path / "ckpt.pt")
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_model(x))


class _RunsCode:
    """A pickled object whose unpickling would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_pt_carrying_code_is_refused(tiny_model, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({**tiny_model.state_dict(), "extra": _RunsCode(marker)}, path)
    with pytest.raises(ModelError, match="refused") as err:
        read_state_dict(path)
    assert "could run code" in str(err.value)
    with pytest.raises(ModelError):
        load_checkpoint_for(_card(), path)
    assert not marker.exists(), "the payload ran"


def test_wrong_architecture_is_a_clear_error(tmp_path: Path) -> None:
    torch.save(create_model("resnet18", 10, 1).state_dict(), tmp_path / "big.pt")
    with pytest.raises(ModelError, match="does not fit this architecture") as err:
        load_checkpoint_for(_card("resnet18_narrow"), tmp_path / "big.pt")
    assert "shape mismatch" in str(err.value) and "--arch" in str(err.value)
    save_model(create_model("resnet50", 10, 1), tmp_path / "r50", _card("resnet50"))
    with pytest.raises(ModelError, match="unexpected tensors|missing tensors"):
        load_checkpoint_for(_card("resnet18"), tmp_path / "r50.safetensors")


def test_wrong_class_count_is_a_clear_error(tmp_path: Path) -> None:
    save_model(create_model("resnet18_narrow", 100, 1), tmp_path / "c100", _card(classes=100))
    with pytest.raises(ModelError, match="the checkpoint has 100 classes, the dataset 10"):
        load_checkpoint_for(_card(classes=10), tmp_path / "c100.safetensors")


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        read_state_dict(tmp_path / "absent.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(ModelError, match="unsupported checkpoint type"):
        read_state_dict(tmp_path / "w.onnx")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="not a valid safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="state_dict of tensors"):
        read_state_dict(tmp_path / "list.pt")


def test_missing_or_broken_card(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="card .* is missing"):
        load_model(tmp_path / "nothing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(tmp_path / "bad")
    (tmp_path / "thin.json").write_text(json.dumps({"arch": "resnet18"}))
    with pytest.raises(ModelError, match="lacks 'class_names'"):
        load_model(tmp_path / "thin")


# ------------------------------------------------------------------------ sample model


def test_sample_model_card(sample_model) -> None:
    card = sample_model.card
    for key in ("arch", "dataset", "class_names", "input_shape", "mean", "std", "test_accuracy", "test_set",
                "training", "weights_sha256", "feature_dim"):
        assert key in card, f"card lacks {key}"
    assert card["dataset"] == "fashion-mnist" and len(card["class_names"]) == 10
    assert card["input_shape"] == [1, 28, 28]
    assert card["training"]["command"].startswith("python -m core train")
    assert "seed" in card["training"]
    assert card["test_accuracy"] >= 92.0, "the shipped model must reach 92% on the full test set"
    assert "10000" in card["test_set"] and "full" in card["test_set"]
    assert sample_model.path.stat().st_size <= 10 * 1024 * 1024
    assert sha256_file(sample_model.path) == card["weights_sha256"]
    assert any(c["name"] == sample_model.path.stem for c in list_sample_models())
    assert sample_model.path.parent == SAMPLE_MODELS


def test_sample_model_accuracy_on_bundled_subset(sample_model, bundled_fashion) -> None:
    acc = accuracy(prepare_model(sample_model.model, torch.device("cpu")), bundled_fashion.test)
    assert acc >= SUBSET_ACCURACY_FLOOR, f"sample model: {acc:.2f}% on the bundled test subset"


def test_untrained_model_fails_the_accuracy_floor(tiny_model, bundled_fashion) -> None:
    """The floor above is meaningful: a model with random weights is far below it."""
    first = torch.arange(300)
    assert accuracy(tiny_model, bundled_fashion.test, first) < SUBSET_ACCURACY_FLOOR - 40
