"""One-off engine experiments on held-out training data: prints the loss terms every 10 steps.

    python bench/explore.py METHOD K FORGET_SEED '{"lr": 0.001, "deletion": "hinge"}' ['{...}' ...]
    FREEZE=bn,bias python bench/explore.py ...   # parameters whose name contains a listed part stay fixed

Forget ids are the CLI's random draw for (K, FORGET_SEED); use seeds >= 100 (the bench uses 0-2).
A_r is measured on 1,000 random training images (seeded); the test set is never read.
The rows in bench/results/v2/explore-k32-seed100.md were made with it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import core.engine as engine  # noqa: E402
from core.anchors import build_anchor_set, load_anchor_texts  # noqa: E402
from core.cli_unlearn import random_forget_ids  # noqa: E402
from core.encoders import get_encoder  # noqa: E402
from core.methods import default_config  # noqa: E402
from core.models import load_model  # noqa: E402
from core.pipeline import cached_dataset  # noqa: E402
from core.train import prepare_model, to_device_format  # noqa: E402


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean() * 100)


def freeze_by_name(parts: list[str]) -> None:
    """Wrap engine.wrap so that parameters whose name contains one of `parts` get no gradient."""
    plain = engine.wrap

    def wrap(m: torch.nn.Module) -> engine.UnlearnedModel:
        u = plain(m)
        for name, p in u.named_parameters():
            if any(part in name for part in parts):
                p.requires_grad_(False)
        return u

    engine.wrap = wrap


def main() -> int:
    method, k, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if seed < 100:
        sys.exit("use forget seeds >= 100: 0-2 are the benchmark's")
    if os.environ.get("FREEZE"):
        freeze_by_name(os.environ["FREEZE"].split(","))
    ds = cached_dataset("fashion-mnist", None)
    model = prepare_model(load_model("fmnist_resnet18_narrow").model, torch.device("cpu")).eval()
    anchors = build_anchor_set(load_anchor_texts(ds.name, ds.class_names), ds.class_names,
                               get_encoder("minilm")).matrix
    r_pos = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(7))[:1000]
    x_r, y_r = to_device_format(ds.train.images(r_pos), "cpu"), ds.train.labels[r_pos]
    pos = ds.train.positions(random_forget_ids(ds.name, None, k, seed))
    x_f, y_f = to_device_format(ds.train.images(pos), "cpu"), ds.train.labels[pos]
    for spec in sys.argv[4:]:
        over = json.loads(spec)
        cfg = default_config(method, ds.name, k=k, **dict(over, seed=seed))

        def on_step(r: dict) -> None:
            if r["step"] % 10 == 0:
                terms = " ".join(f"{a}={b:.3g}" for a, b in r["terms"].items())
                print(f"  step {r['step']} forget acc {r['forget_acc']} {terms}", flush=True)

        t0 = time.perf_counter()
        try:
            out = engine.run_unlearning(model, x_f, y_f, ds.num_classes, cfg, anchors,
                                        engine.Callbacks(on_step=on_step))
        except engine.UnlearnError as exc:
            print(json.dumps(over), "FAILED", exc, flush=True)
            continue
        print(json.dumps(over), f"k={k} seed={seed} A_f {accuracy(out.model, x_f, y_f):.1f} "
              f"A_r {accuracy(out.model, x_r, y_r):.2f} steps {out.steps} {time.perf_counter() - t0:.0f}s "
              f"phases {json.dumps({k: round(v, 1) for k, v in out.timings.items()})}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
