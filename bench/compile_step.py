"""Whether torch.compile pays for itself on a k=32 StructGuard update step on this machine.

One step's forward and backward (the default k=32 step: 288 rows entering at layer2, bfloat16 where native), eager
against `torch.compile` (inductor), with the compile time. Eager runs before and after the compiled one, since the
machine's speed drifts.

    python bench/compile_step.py [--out bench/results/compile-step.md]

Run it with nothing else on the machine: the numbers are wall-clock milliseconds.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from step_profile import model_and_images, part_parser, per_call_ms, publish  # noqa: E402  (bench/ is the script's folder)


def main() -> int:
    args = part_parser(__doc__, "bench/results/compile-step.md", 288,
                       "rows a step computes (k=32: 32 forget, 128 + 128 proxy)").parse_args()
    import torch
    import torch.nn.functional as F

    from core.engine import UnlearnedModel, entering_at
    from core.models import freeze_before, trunk_dtype

    loaded, base, images, dtype = model_and_images(args.model, args.rows)
    with torch.no_grad():
        z = base.encode(images, "layer2")
    y = torch.randint(len(loaded.card["class_names"]), (args.rows,))
    live = UnlearnedModel(copy.deepcopy(base))
    freeze_before(live.base(), "layer2")

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
    return publish(args.out, lines)


if __name__ == "__main__":
    raise SystemExit(main())
