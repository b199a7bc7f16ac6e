"""How much of a k=32 run's evaluation the frozen stages cost: the measurement rows through the whole model against
the same rows entering at layer2 (the stem and layer1 keep the original weights in a k=32 run, so their outputs on
the retain and test rows are the same for every such run and could be kept).

    python bench/eval_stages.py [--out bench/results/eval-stages.md]

Run it with nothing else on the machine: the numbers are wall-clock seconds, median of --repeats.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from step_profile import model_and_images, part_parser, publish  # noqa: E402  (bench/ is the script's folder)


def main() -> int:
    p = part_parser(__doc__, "bench/results/eval-stages.md", 15000, "measured rows (k=32: 5,000 retain + 10,000 test)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torch

    from core.engine import entering_at
    from core.models import trunk_dtype

    _, model, x, dtype = model_and_images(args.model, args.rows)
    chunks = range(0, args.rows, args.batch)
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        z = torch.cat([model.encode(x[i:i + args.batch], "layer2") for i in chunks])
    encode_s = time.perf_counter() - t0

    def whole() -> None:
        with torch.no_grad(), trunk_dtype(dtype):
            for i in chunks:
                model(x[i:i + args.batch]).argmax(1)

    def from_layer2() -> None:
        with torch.no_grad(), trunk_dtype(dtype), entering_at("layer2", model):
            for i in chunks:
                model(z[i:i + args.batch]).argmax(1)

    times: dict[str, list[float]] = {"whole model": [], "from layer2 (stem and layer1 kept)": []}
    whole(), from_layer2()  # warm-up
    for _ in range(args.repeats):  # interleaved: the machine's speed drifts
        for name, fn in zip(times, (whole, from_layer2), strict=True):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["whole model"])
    lines = [f"Command: `python bench/eval_stages.py {' '.join(sys.argv[1:])}`; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {args.rows} rows of {args.batch}, "
             f"{'bf16' if dtype else 'fp32'}; median of {args.repeats} (min-max).", "",
             "| rows enter at | s | ratio |", "|---|---|---|"]
    for name, ts in times.items():
        lines.append(f"| {name} | {statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f}) "
                     f"| {statistics.median(ts) / base:.2f} |")
    lines += ["", f"Keeping layer2's inputs for these rows takes {z.numel() * z.element_size() / 2**20:.0f} MiB "
              f"({z.dtype}); computing them took {encode_s:.2f} s."]
    return publish(args.out, lines)


if __name__ == "__main__":
    raise SystemExit(main())
