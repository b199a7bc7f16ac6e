"""The deferred forget check (core.engine.DEFER_SLACK): is its slack safe, and does it change a run?

For each method and k, the default run on a bench forget set twice: with the float32 check after every step
(DEFER_SLACK None) and deferred. Reports the largest gap between the forget margins of a step's forward (the steps'
dtype, all forget images in one joint batch) and the float32 check of the same weights, measured at every step of
the deferred run (its spy's extra float32 forward leaves the run alone but costs time, so speed is measured elsewhere:
bench/results/speed-k32-intel-v16-ab.md); how many float32 checks each run made; and whether both runs took the same
steps to bit-identical weights.

    python bench/deferred_check.py [--runs structguard:32,structguard:8,adv:32,l2ul:32] [--seed 0]
        [--out bench/results/deferred-check.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import engine  # noqa: E402
from core.methods import true_and_best_other  # noqa: E402


def one_run(method: str, k: int, seed: int, slack: float | None) -> dict:
    """A default run with DEFER_SLACK = slack; with deferral, per step the gap between the step's forward and a float32
    check of the same weights."""
    from core.anchors import build_anchor_set, load_anchor_texts
    from core.cli_unlearn import random_forget_ids
    from core.encoders import get_encoder
    from core.methods import default_config
    from core.models import load_model
    from core.pipeline import cached_dataset
    from core.train import prepare_model, to_device_format

    ds = cached_dataset("fashion-mnist", None)
    pos = ds.train.positions(random_forget_ids("fashion-mnist", None, k, seed))
    x, y = to_device_format(ds.train.images(pos), torch.device("cpu")), ds.train.labels[pos].clone()
    model = prepare_model(load_model("fmnist_resnet18_narrow").model, torch.device("cpu")).eval()
    anchors = build_anchor_set(load_anchor_texts("fashion-mnist", ds.class_names), ds.class_names,
                               get_encoder("minilm")).matrix
    gaps: list[float] = []
    checks: list[int] = []
    saved = engine.DEFER_SLACK, engine._deferred_check, engine._forget_accuracy
    real_check, real_forget = saved[1], saved[2]

    def spy(ctx, live, x_f, y_f, step):  # the step's forward against a float32 check of the same weights
        rows, logits = ctx.state["forget_logits"]
        true, other = true_and_best_other(logits.float(), y_f[rows])
        with torch.no_grad():
            t32, o32 = true_and_best_other(live.eval()(x_f), y_f)
        gaps.append(float(((t32 - o32)[rows] - (true - other)).abs().max()))
        return real_check(ctx, live, x_f, y_f, step)

    def counted(*args, **kwargs):
        checks.append(1)
        return real_forget(*args, **kwargs)

    engine.DEFER_SLACK, engine._forget_accuracy, engine._deferred_check = slack, counted, spy
    try:
        out = engine.run_unlearning(model, x, y, ds.num_classes, default_config(method, "fashion-mnist", k, seed=seed),
                                    anchors)
    finally:
        engine.DEFER_SLACK, engine._deferred_check, engine._forget_accuracy = saved
    return {"steps": out.steps, "checks": len(checks), "gap": max(gaps, default=float("nan")),
            "state": out.model.state_dict(), "stop": out.stop_reason}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", default="structguard:32,structguard:8,adv:32,l2ul:32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/deferred-check.md")
    args = p.parse_args()
    slack = engine.DEFER_SLACK
    lines = [f"Command: `python bench/deferred_check.py {' '.join(sys.argv[1:])}`; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; DEFER_SLACK {slack}; bench forget set seed {args.seed}. Gap: the "
             "largest |margin of the step's forward - margin of the float32 check| over the forget images and the "
             "steps of the run (logits).", "",
             "| method | k | steps | largest gap | float32 checks (every step / deferred) | same steps and weights "
             "|", "|---|---|---|---|---|---|"]
    for item in args.runs.split(","):
        method, k = item.split(":")
        eager = one_run(method, int(k), args.seed, None)
        lazy = one_run(method, int(k), args.seed, slack)
        same = eager["steps"] == lazy["steps"] and eager["stop"] == lazy["stop"] and all(
            torch.equal(a, b) for a, b in zip(eager["state"].values(), lazy["state"].values(), strict=True))
        lines.append(f"| {method} | {k} | {eager['steps']} | {lazy['gap']:.3f} | {eager['checks']} / "
                     f"{lazy['checks']} | {'yes' if same else 'NO'} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
