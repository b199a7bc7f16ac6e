"""CIFAR-stem ResNets with normalisation inside and an explicit features/classify split.

Models are built by name from a registry; weights are stored as safetensors next to
a JSON card. User checkpoints load from safetensors, or from .pt/.pth through
torch.load(weights_only=True) only: nothing user-supplied is ever unpickled freely.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .runs import write_atomic  # atomic, cleaned up on failure, the umask's mode (safetensors' save_file makes 0600)

SAMPLE_MODELS = Path(__file__).resolve().parent.parent / "sample_models"


class ModelError(RuntimeError):
    """A model or checkpoint could not be built or loaded; the message says why."""


# ResNet stages in forward order: where inputs can enter (ResNet.entry) and where updates can start.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")

# The dtype a ResNet's conv stages compute in (autocast) inside `trunk_dtype`; None: float32. Only the convolutions
# are cheaper in bfloat16: features leave the trunk as float32, so the head, the projector, the losses and every
# measurement outside the block stay float32.
_TRUNK_DTYPE: ContextVar[torch.dtype | None] = ContextVar("trunk_dtype", default=None)
PRECISIONS = ("auto", "fp32", "bf16")


@contextmanager
def trunk_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside the block, ResNet conv stages compute in `dtype` (None: float32)."""
    token = _TRUNK_DTYPE.set(dtype)
    try:
        yield
    finally:
        _TRUNK_DTYPE.reset(token)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 natively (faster than float32): CUDA that supports it, or a CPU with
    AVX-512 BF16 or AMX. Elsewhere bfloat16 is emulated and slower, so "auto" stays float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:  # private probes, stable since torch 2.1; any failure means: not known to be fast
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The trunk dtype for a precision setting: "fp32" None, "bf16" bfloat16, "auto" bfloat16 where native."""
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """What run.json records for a trunk dtype: "bf16" or "fp32" (None)."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)); with BatchNorm in eval mode, one convolution with the BatchNorm folded into its weight and bias.

    Eval-mode BatchNorm is a fixed per-channel affine map, so folding it is exact up to rounding, and gradients still
    reach the conv weight and BatchNorm's affine through the fold. It saves a pass over the activations forward and
    backward: a tenth of a frozen-BatchNorm update step and of evaluation (bench/results/fold-bn-intel.md)."""
    if bn.training or bn.running_var is None or bn.weight is None or bn.bias is None:
        return bn(conv(x))
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    w, b = conv.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale
    if _small_map_bf16(conv, x):  # autocast's casts, which a custom Function does not get
        bf16 = torch.bfloat16
        return _SmallMapConv.apply(x.to(bf16), w.to(bf16), b.to(bf16), conv.stride[0])
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


# The weight gradient of a 3x3 convolution sums over every row and output position. Where the output map is small
# (at most SMALL_MAP pixels a side: the last stage of a ResNet on 28- or 32-pixel images), oneDNN's bfloat16 kernel
# for it is 1.4-2.8x slower on the CPU than the same sum computed as a forward convolution that takes the rows as
# channels (bench/conv_backward.py): a tenth of a k=32 update step. Only the rounding differs. In float32 oneDNN's
# own kernel is faster, and on CUDA cuDNN has no such gap measured, so both keep it.
SMALL_MAP = 4


def _small_map_bf16(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether conv's weight gradient is due on a small output map, computed in bfloat16 on the CPU."""
    if not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and conv.weight.requires_grad
            and torch.is_grad_enabled() and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return False
    square = conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride[0] == conv.stride[1]
    out = (x.shape[-1] - 1) // conv.stride[1] + 1
    return square and conv.dilation == (1, 1) and conv.groups == 1 and out <= SMALL_MAP


class _SmallMapConv(torch.autograd.Function):
    """F.conv2d(x, w, b, stride, padding=1) for a 3x3 kernel, with the weight gradient computed as a convolution of
    the input (rows as channels) by the output gradient (dilated by the stride)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.stride = stride
        return F.conv2d(x, w, b, stride, 1)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        s, need = ctx.stride, ctx.needs_input_grad
        gx = gw = gb = None
        if need[0]:
            gx = torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1,
                                                     [True, False, False])[0]
        if need[1]:
            rows_as_channels = x.transpose(0, 1).contiguous(memory_format=torch.channels_last)
            kernel = g.transpose(0, 1).contiguous(memory_format=torch.channels_last)
            gw = F.conv2d(rows_as_channels, kernel, None, 1, 1, s).transpose(0, 1)[:, :, :3, :3]
        if need[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None


def _shortcut(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return conv_bn(*block.shortcut, x) if len(block.shortcut) else x


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # ReLU in place: no backward needs what it overwrites
        out = F.relu_(conv_bn(self.conv1, self.bn1, x))
        out = conv_bn(self.conv2, self.bn2, out)
        return F.relu_(out + _shortcut(self, x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(conv_bn(self.conv1, self.bn1, x))
        out = F.relu_(conv_bn(self.conv2, self.bn2, out))
        out = conv_bn(self.conv3, self.bn3, out)
        return F.relu_(out + _shortcut(self, x))


class ResNet(nn.Module):
    """ResNet with the CIFAR stem (3x3 conv, stride 1, no max-pool).

    Inputs are images in [0, 1]; normalisation happens inside, so attacks and
    Grad-CAM work in pixel space. `features(x)` is the penultimate vector h(x),
    `classify(f)` the final linear layer, and forward = classify(features(x)).
    """

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int, in_channels: int = 3,
                 width: int = 64, mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.5,)) -> None:
        super().__init__()
        if len(mean) not in (1, in_channels) or len(std) not in (1, in_channels):
            raise ModelError(f"mean/std need 1 or {in_channels} values")
        def per_channel(v: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).expand(1, in_channels, 1, 1).clone()

        self.register_buffer("mean", per_channel(mean))
        self.register_buffer("std", per_channel(std))
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin, stages = width, []
        for i, n in enumerate(layers):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, width * 2**i, stride))
                cin = width * 2**i * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = cin
        self.linear = nn.Linear(cin, num_classes)

    # Where inputs enter (STAGES): "stem" takes images; a later stage takes what `encode` gives for it. The
    # engine sets it while it updates only the later stages, so the frozen ones run once per input, not per step.
    entry = "stem"

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu_(conv_bn(self.conv1, self.bn1, (x - self.mean) / self.std))

    def encode(self, x: torch.Tensor, entry: str) -> torch.Tensor:
        """The input of stage `entry` for images x: the stages before it run (pooled features for "head")."""
        i = STAGES.index(entry)
        if i == 0:
            return x
        x = self._stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4)[:i - 1]:
            x = layer(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1) if entry == "head" else x

    def enters_by_convolution(self, entry: str) -> bool:
        """Whether every use of an input entering at `entry` is a convolution (the stage's first block, with a conv
        shortcut): under autocast such inputs may be stored in its dtype already, with bit-identical outputs."""
        if entry not in STAGES[1:5]:  # the stem normalises in float32; the head is a float32 linear layer
            return False
        first = getattr(self, entry)[0]
        return len(first.shortcut) > 0

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last conv stage (Grad-CAM target), for inputs entering at `self.entry`; float32 (float64 for
        a model run in double, as numerical checks do), computed in the dtype `trunk_dtype` sets."""
        i, dtype = STAGES.index(self.entry), _TRUNK_DTYPE.get()
        with torch.autocast(x.device.type, dtype=dtype) if dtype is not None else nullcontext():
            if i == 0:
                x = self._stem(x)
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4)[max(i - 1, 0):]:
                x = layer(x)
        return x.to(torch.promote_types(x.dtype, torch.float32))  # undo autocast's half precision, keep float64

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.entry == "head":
            return x
        return torch.flatten(F.adaptive_avg_pool2d(self.feature_map(x), 1), 1)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def stage_modules(model: ResNet) -> dict[str, tuple[nn.Module, ...]]:
    """The ResNet's stages in forward order (methods.STAGES names them)."""
    return {"stem": (model.conv1, model.bn1), "layer1": (model.layer1,), "layer2": (model.layer2,),
            "layer3": (model.layer3,), "layer4": (model.layer4,), "head": (model.linear,)}


def freeze_before(model: ResNet, stage: str) -> None:
    """Stop gradients to every stage before `stage`: they keep their weights, and backward stops there."""
    if stage not in STAGES:
        raise ModelError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if stage == STAGES[0]:
        return  # nothing comes before the stem (and the model need not be one of our ResNets)
    for name, modules in stage_modules(model).items():
        if name == stage:
            return
        for m in modules:
            m.requires_grad_(False)


@dataclass(frozen=True)
class ArchSpec:
    block: type[nn.Module]
    layers: tuple[int, ...]
    width: int
    note: str


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec(BasicBlock, (2, 2, 2, 2), 64, "the paper's ResNet-18 (512-d features)"),
    "resnet18_narrow": ArchSpec(BasicBlock, (2, 2, 2, 2), 16, "ResNet-18 at 1/4 width (128-d features), for CPU"),
    "resnet34": ArchSpec(BasicBlock, (3, 4, 6, 3), 64, "ResNet-34 (512-d features)"),
    "resnet50": ArchSpec(Bottleneck, (3, 4, 6, 3), 64, "ResNet-50, the paper's CIFAR-100 model (2048-d)"),
}


def list_models() -> list[str]:
    return sorted(ARCHS)


def create_model(arch: str, num_classes: int, in_channels: int = 3,
                 mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.5,)) -> ResNet:
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {', '.join(list_models())}")
    spec = ARCHS[arch]
    return ResNet(spec.block, list(spec.layers), num_classes, in_channels, spec.width, mean, std)


# ------------------------------------------------------------------ persistence


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(model: ResNet, path: str | Path, card: dict) -> dict:
    """Write `<path>.safetensors` and `<path>.json`; returns the final card."""
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path.with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(weights, safetensors_bytes(state), what="the model weights")
    card = dict(card, weights_file=weights.name, weights_sha256=sha256_file(weights))
    write_atomic(path.with_suffix(".json"), json.dumps(card, indent=2) + "\n", what="the model card")
    return card


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors, or from .pt/.pth with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"{path} is not a valid safetensors file: {exc}") from exc
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelError(
                f"{path} holds Python objects beyond plain tensors, so it was refused (loading it could run code). "
                "Save only the state_dict, or convert it to .safetensors."
            ) from exc
        except Exception as exc:
            raise ModelError(f"{path} could not be read as a PyTorch checkpoint: {exc}") from exc
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ModelError(f"{path} does not hold a state_dict of tensors")
        return {k.removeprefix("module."): v for k, v in obj.items()}
    raise ModelError(f"{path}: unsupported checkpoint type {path.suffix!r}; use .safetensors, .pt or .pth")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a state_dict strictly, with a readable message on any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or wrong:
        lines = []
        if wrong:
            lines.append("shape mismatch (" + "; ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else "") + ")")
        theirs, ours = state.get("linear.weight"), own.get("linear.weight")
        if theirs is not None and ours is not None and theirs.shape[0] != ours.shape[0]:
            lines.append(f"the checkpoint has {theirs.shape[0]} classes, the dataset {ours.shape[0]}")
        if missing:
            lines.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if extra:
            lines.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
        raise ModelError(f"{source} does not fit this architecture: " + "; ".join(lines)
                         + ". Check --arch and that the model was trained on this dataset.")
    model.load_state_dict(state)


@dataclass
class LoadedModel:
    model: ResNet
    card: dict
    path: Path


def load_card(path: str | Path) -> dict:
    path = Path(path).with_suffix(".json")
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"model card {path} is missing") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"model card {path} is not valid JSON: {exc}") from exc
    for key in ("arch", "class_names", "input_shape"):
        if key not in card:
            raise ModelError(f"model card {path} lacks {key!r}")
    return card


def model_from_card(card: dict) -> ResNet:
    return create_model(card["arch"], len(card["class_names"]), card["input_shape"][0],
                        tuple(card.get("mean", (0.5,))), tuple(card.get("std", (0.5,))))


def load_model(name_or_path: str | Path, verify: bool = True) -> LoadedModel:
    """Load a model by sample name (see list_sample_models) or card/weights path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists() and (SAMPLE_MODELS / f"{path}.json").is_file():
        path = SAMPLE_MODELS / str(name_or_path)
    base = path.with_suffix("")
    card = load_card(base)
    weights = base.parent / card.get("weights_file", base.name + ".safetensors")
    if verify and card.get("weights_sha256") and weights.is_file() and sha256_file(weights) != card["weights_sha256"]:
        raise ModelError(f"{weights} does not match the sha256 in its card: the file was changed or damaged")
    model = model_from_card(card)
    load_weights(model, read_state_dict(weights), str(weights))
    model.eval()
    return LoadedModel(model, card, weights)


def load_checkpoint_for(card: dict, checkpoint: str | Path) -> ResNet:
    """Build the card's architecture and fill it from a user checkpoint."""
    model = model_from_card(card)
    load_weights(model, read_state_dict(checkpoint), str(checkpoint))
    return model.eval()


def list_sample_models() -> list[dict]:
    cards = []
    for p in sorted(SAMPLE_MODELS.glob("*.json")):
        try:
            cards.append(dict(load_card(p), name=p.stem))
        except ModelError:
            continue
    return cards


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

