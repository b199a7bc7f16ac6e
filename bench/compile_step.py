"""Whether torch.compile pays for itself on a k=32 StructGuard update step on this machine.

One step's forward and backward (the default k=32 step: 288 rows entering at layer2, bfloat16 where native), eager
against `torch.compile` (inductor), with the compile time. Eager runs before and after the compiled one, since the
machine's speed drifts.

    python bench/compile_step.py [--out bench/results/compile-step.md]

Run it with nothing else on the machine: the numbers are wall-clock milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from step_profile import per_call_ms  # noqa: E402  (bench/ is the script's folder)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", default="bench/results/compile-step.md")
    p.add_argument("--model", default="fmnist_resnet18_narrow")
    p.add_argument("--rows", type=int, default=288, help="rows a step computes (k=32: 32 forget, 128 + 128 proxy)")
    args = p.parse_args()
    import torch
    import torch.nn.functional as F

    from core.engine import UnlearnedModel, entering_at
    from core.models import compute_dtype, freeze_before, load_model, trunk_dtype
    from core.train import prepare_model

    torch.manual_seed(0)
    loaded = load_model(args.model)
    base = prepare_model(loaded.model.eval(), torch.device("cpu"))
    shape = tuple(loaded.card["input_shape"])
    with torch.no_grad():
        z = base.encode(torch.rand(args.rows, *shape).contiguous(memory_format=torch.channels_last), "layer2")
    y = torch.randint(len(loaded.card["class_names"]), (args.rows,))
    live = UnlearnedModel(copy.deepcopy(base))
    freeze_before(live.base(), "layer2")
    dtype = compute_dtype("auto", torch.device("cpu"))

    def step(model: torch.nn.Module) -> None:
        with trunk_dtype(dtype):
            loss = F.cross_entropy(model(z), y)
        live.zero_grad(set_to_none=True)
        loss.backward()

    with entering_at("layer2", live):
        before = per_call_ms(lambda: step(live))
        t0 = time.perf_counter()
        compiled = torch.compile(live)
        step(compiled)
        compile_s = time.perf_counter() - t0
        after_compile = per_call_ms(lambda: step(compiled))
        after = per_call_ms(lambda: step(live))
    eager = (before + after) / 2
    lines = [f"Command: `python bench/compile_step.py {' '.join(sys.argv[1:])}`; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {args.rows} rows from layer2 in "
             f"{'bf16' if dtype else 'fp32'}; mean of 30 calls after 3 warm-up calls.", "",
             "| step | ms | ratio to eager |", "|---|---|---|",
             f"| eager (before, after) | {before:.1f}, {after:.1f} | 1 |",
             f"| torch.compile | {after_compile:.1f} | {after_compile / eager:.2f} |", "",
             f"The first compiled call took {compile_s:.1f} s (compilation included)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
