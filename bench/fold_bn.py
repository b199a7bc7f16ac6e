"""What folding eval-mode BatchNorm into its convolution (core.models.conv_bn) and the evaluation batch buy.

Both sides run in one process: the unfolded side swaps `core.models.conv_bn` for the plain `bn(conv(x))` it
replaces. Timed: the engine's evaluation pass over the test set (`core.metrics.outputs`, float32) at two batch
sizes, and the seconds per update step of StructGuard at k=32 seed 0 (its default: bfloat16 where native, frozen
BatchNorm) over whole runs. Folding changes rounding only, so the two runs may take different numbers of steps;
seconds per step compare.

    python bench/fold_bn.py [--repeats 3] [--out bench/results/fold-bn.md]

Run it with nothing else on the machine: the numbers are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import core.models  # noqa: E402

FOLDED = core.models.conv_bn


@contextmanager
def folding(on: bool) -> Iterator[None]:
    core.models.conv_bn = FOLDED if on else (lambda conv, bn, x: bn(conv(x)))
    try:
        yield
    finally:
        core.models.conv_bn = FOLDED


def median_of(fn: Callable[[], float], repeats: int) -> tuple[float, float, float]:
    xs = [fn() for _ in range(repeats)]
    return statistics.median(xs), min(xs), max(xs)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/fold-bn.md")
    args = p.parse_args()

    import core.metrics as metrics
    from core.cli_unlearn import random_forget_ids
    from core.engine import Callbacks
    from core.pipeline import RunRequest, cached_dataset, resolve, unlearn

    ids = random_forget_ids("fashion-mnist", None, 32, 0)
    with tempfile.TemporaryDirectory() as tmp:
        request = RunRequest(forget_ids=ids, method="structguard", runs_root=tmp)
        res = resolve(request, Callbacks())
        model = res.start.model
        test = cached_dataset("fashion-mnist", None).test
        rows, accs = [], {}

        def evaluate(batch: int) -> float:
            metrics.CHECKED_CPU_BATCH = batch
            t0 = time.perf_counter()
            out = metrics.outputs(model, test, check=lambda: None)
            accs[batch] = float((out.probs.argmax(1) == test.labels.numpy()).mean() * 100)
            return time.perf_counter() - t0

        def per_step() -> float:
            outcome = unlearn(res, Callbacks()).outcome
            return outcome.timings["updates"] / outcome.steps

        saved = metrics.CHECKED_CPU_BATCH
        try:
            for on in (False, True):
                with folding(on):
                    evaluate(256)  # warm-up: first-touch allocations, oneDNN primitive caches
                    per_step()
                    for batch in (256, 128):
                        rows.append((f"test-set evaluation, float32, batch {batch}", on,
                                     median_of(lambda b=batch: evaluate(b), args.repeats), accs[batch]))
                    rows.append(("StructGuard k=32 update step (s/step)", on, median_of(per_step, args.repeats), None))
        finally:
            metrics.CHECKED_CPU_BATCH = saved

    def reference(name: str) -> float:  # the unfolded row at batch 256: what the engine did before
        want = "update step" if "update step" in name else "batch 256"
        return next(m for n, on, (m, _, _), _ in rows if not on and want in n)

    lines = [f"Command: `python bench/fold_bn.py --repeats {args.repeats} --out {args.out}`; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} (min-max). "
             "Ratio: against the unfolded row of the same measurement at batch 256 (the old defaults), same run.", "",
             "| measurement | BatchNorm folded | seconds | ratio | A_test |", "|---|---|---|---|---|"]
    for name, on, (m, lo, hi), acc in rows:
        ref = reference(name)
        lines.append(f"| {name} | {'yes' if on else 'no'} | {m:.3f} ({lo:.3f}-{hi:.3f}) | {m / ref:.2f}x | "
                     f"{'' if acc is None else f'{acc:.2f}'} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
