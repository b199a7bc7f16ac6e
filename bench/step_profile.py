"""Where the time of a warm StructGuard k=32 run goes, operator by operator and part by part of one update step.

1. torch.profiler over one warm `execute_run` (bench set 0, the defaults): the operators with the most self time.
2. The parts of one update step timed alone, on the shapes of that run (layers 2-4 are updated, inputs enter at
   layer2): forward and backward of one step's rows in the step's dtype, the float32 forget check, the SR penalty,
   the SGD update.

    python bench/step_profile.py [--out bench/results/step-profile-k32.md]

Run it with nothing else on the machine: the numbers are wall-clock milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def per_call_ms(fn: Callable[[], None], repeats: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1000


def part_parser(doc: str, out: str, rows: int, rows_help: str) -> argparse.ArgumentParser:
    """The options of a bench script that times one part on the sample model: --out, --model and --rows."""
    p = argparse.ArgumentParser(description=doc.split("\n", 1)[0])
    p.add_argument("--out", default=out)
    p.add_argument("--model", default="fmnist_resnet18_narrow")
    p.add_argument("--rows", type=int, default=rows, help=rows_help)
    return p


def publish(out: str, lines: list[str]) -> int:
    """Write a result table (the command line first) to `out`, print it, and give the script's exit status."""
    text = "\n".join(lines) + "\n"
    Path(out).write_text(text)
    print(text, end="")
    return 0


def model_and_images(name: str, rows: int, precision: str = "auto", seed: int = 0) -> tuple:
    """(loaded model, its network prepared as runs prepare it on the CPU, `rows` random images of its input shape in
    channels_last, the trunk dtype of `precision` here): the shared start of the bench scripts that time one part."""
    import torch

    from core.models import compute_dtype, load_model
    from core.train import prepare_model

    torch.manual_seed(seed)
    loaded = load_model(name)
    model = prepare_model(loaded.model.eval(), torch.device("cpu"))
    images = torch.rand(rows, *loaded.card["input_shape"]).contiguous(memory_format=torch.channels_last)
    return loaded, model, images, compute_dtype(precision, torch.device("cpu"))


def step_parts(meta: dict, repeats: int = 30) -> list[tuple[str, float]]:
    """Milliseconds of each part of one update step, with the run's sizes, dtype and first updated stage."""
    import torch
    import torch.nn.functional as F

    from core.engine import UnlearnedModel, entering_at
    from core.methods import UnlearnConfig, weighted_l2_penalty
    from core.models import freeze_before, trunk_dtype
    from core.sgd import SGD

    cfg = UnlearnConfig.from_dict(meta["config"])
    k = len(meta["forget_ids"])
    rows = min(cfg.batch_size, k) + cfg.batch_size + (cfg.mix_batch if cfg.mix_weight > 0 else 0)
    _, base, images, dtype = model_and_images(meta["model"]["name"], rows, cfg.precision)
    with torch.no_grad():
        z = base.encode(images, cfg.train_from)
    live = UnlearnedModel(copy.deepcopy(base))
    freeze_before(live.base(), cfg.train_from)
    y = torch.randint(10, (rows,))
    params = [p for p in live.parameters() if p.requires_grad]
    ref = {n: p.detach().clone() for n, p in live.backbone.named_parameters() if p.requires_grad}
    weights = {n: torch.rand_like(p) for n, p in ref.items()}
    opt = SGD([(params, cfg.lr)], momentum=cfg.momentum)  # the engine's update

    def forward_backward() -> None:
        with trunk_dtype(dtype):
            loss = F.cross_entropy(live(z), y)
        live.zero_grad(set_to_none=True)
        loss.backward()

    def check() -> None:
        with torch.no_grad():
            live(z[:k]).argmax(1)

    def penalty() -> None:
        weighted_l2_penalty(live.backbone, ref, weights).backward()

    with entering_at(cfg.train_from, live):
        name = f"forward + backward, {rows} rows ({'bf16' if dtype else 'fp32'})"
        parts = [(name, per_call_ms(forward_backward, repeats)),
                 (f"forget check, {k} rows (fp32)", per_call_ms(check, repeats)),
                 ("SR penalty, forward + backward", per_call_ms(penalty, repeats))]
        for p in params:
            p.grad = torch.randn_like(p)
        parts.append(("SGD update", per_call_ms(opt.step, repeats)))
    return parts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", default="bench/results/step-profile-k32.md")
    p.add_argument("--rows", type=int, default=15, help="operators listed")
    args = p.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from core.cli_unlearn import random_forget_ids
    from core.pipeline import RunRequest, execute_run

    ids = random_forget_ids("fashion-mnist", None, 32, 0)
    with tempfile.TemporaryDirectory() as tmp:
        execute_run(RunRequest(forget_ids=ids, method="structguard", runs_root=tmp))  # loads everything
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run = execute_run(RunRequest(forget_ids=ids, method="structguard", runs_root=tmp))
        wall = time.perf_counter() - t0
        meta = json.loads((run / "run.json").read_text())
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    lines = [f"Command: `python bench/step_profile.py {' '.join(sys.argv[1:])}`; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads. StructGuard k=32, bench set 0, defaults: {meta['steps']} steps, "
             f"phases (s) {json.dumps(meta['timings'])}; {wall:.1f} s under the profiler, {total:.1f} s of "
             "operator self time.", "",
             "| operator | self s | share | calls |", "|---|---|---|---|"]
    for e in events[:args.rows]:
        lines.append(f"| {e.key} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / 1e6 / total:.0%} "
                     f"| {e.count} |")
    lines += ["", "One update step, part by part (mean of 30 calls after 3 warm-up calls):", "",
              "| part | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in step_parts(meta)]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
