"""Time the engine's evaluation pass on the test set with the conv stages in float32 and in bfloat16.

    python bench/eval_precision.py [--repeats 3] [--runs 'RUNS_DIR/*-k32-*'] [--out bench/results/eval-precision.md]

--runs also compares the two precisions' A_test and A_f on each unlearned model saved in the matching run folders,
with the smallest margin by which a forget image is misclassified (float32): the engine stops as soon as every forget
image is wrong in float32, often by a hair, and bfloat16 rounding can flip such an image back.

The evidence behind RunRequest.eval_precision="auto" (bfloat16 for the retain and test rows, float32 for the forget
set; docs/METHOD.md, v10). Run it with nothing else on the machine (wall-clock seconds, torch on 2 threads as a
run is); bfloat16 only pays where the CPU has it natively (AVX-512 BF16, AMX).
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.data import Split, load_fashion_mnist  # noqa: E402
from core.engine import load_unlearned  # noqa: E402
from core.metrics import accuracy_from_probs, outputs  # noqa: E402
from core.models import load_model, trunk_dtype  # noqa: E402
from core.train import prepare_model, to_device_format  # noqa: E402


def evaluate(model: torch.nn.Module, rows: Split | torch.Tensor, dtype: torch.dtype | None) -> tuple[float, np.ndarray]:
    """(seconds, softmax probabilities) of the engine's evaluation pass (`core.metrics.outputs`) over `rows`, with
    the conv stages computing in `dtype` (`core.models.trunk_dtype`; None: float32)."""
    t0 = time.perf_counter()
    with trunk_dtype(dtype):
        probs = outputs(model, rows).probs
    return time.perf_counter() - t0, probs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runs", default=None, help="a glob of run folders whose unlearned models to compare as well")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    model = prepare_model(load_model("fmnist_resnet18_narrow").model, cpu).eval()
    data = load_fashion_mnist(None, download=False)
    test = data.test
    y = test.labels.numpy()
    evaluate(model, test, None), evaluate(model, test, torch.bfloat16)  # warm-up: kernels, allocator
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(a.repeats):
        t32, l32 = evaluate(model, test, None)
        t16, l16 = evaluate(model, test, torch.bfloat16)
        times["fp32"].append(t32)
        times["bf16"].append(t16)
    p32, p16 = l32.argmax(1), l16.argmax(1)
    med = {k: statistics.median(v) for k, v in times.items()}
    runs = f" --runs '{a.runs}'" if a.runs else ""
    lines = [f"Command: `python bench/eval_precision.py --repeats {a.repeats}{runs}`; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
             f"the sample model on the {len(y)} test images, median of {a.repeats} (min-max).", "",
             "| precision | seconds | A_test |", "|---|---|---|"]
    for k, probs in (("fp32", l32), ("bf16", l16)):
        lines.append(f"| {k} | {med[k]:.2f} ({min(times[k]):.2f}-{max(times[k]):.2f}) | "
                     f"{accuracy_from_probs(probs, y):.2f} |")
    lines += ["", f"bf16 / fp32 time: {med['bf16'] / med['fp32']:.2f}; predictions that differ: "
              f"{int((p32 != p16).sum())} of {len(y)}; largest probability difference: {np.abs(l32 - l16).max():.3f}."]
    if a.runs:
        train = data.train
        lines += ["", "Unlearned models (the conv stages in each precision):", "",
                  "| run | A_test fp32 | A_test bf16 | bf16 - fp32 | test predictions that differ | A_f fp32 "
                  "| A_f bf16 | smallest forget margin (fp32 logits) |", "|---|---|---|---|---|---|---|---|"]
        for run in sorted(glob.glob(a.runs)):
            unlearned = load_unlearned(run).eval()
            _, u32 = evaluate(unlearned, test, None)
            _, u16 = evaluate(unlearned, test, torch.bfloat16)
            acc32, acc16 = accuracy_from_probs(u32, y), accuracy_from_probs(u16, y)
            pos = train.positions(json.loads((Path(run) / "run.json").read_text())["forget_ids"])
            x_f, y_f = train.images(pos), train.labels[pos]
            f16 = evaluate(unlearned, x_f, torch.bfloat16)[1]
            with torch.no_grad():  # float32: A_f and the best other logit minus the true one (> 0: forgotten)
                logits = unlearned(to_device_format(x_f, cpu))
            f32 = logits.softmax(1).numpy()
            margin = float((logits.scatter(1, y_f[:, None], float("-inf")).amax(1)
                            - logits.gather(1, y_f[:, None]).squeeze(1)).min())
            lines.append(f"| {Path(run).name} | {acc32:.2f} | {acc16:.2f} | {acc16 - acc32:+.2f} | "
                         f"{int((u32.argmax(1) != u16.argmax(1)).sum())} | {accuracy_from_probs(f32, y_f.numpy()):.1f} "
                         f"| {accuracy_from_probs(f16, y_f.numpy()):.1f} | {margin:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
