"""`python -m core unlearn` (one run) and `python -m core bench` (a grid of runs -> markdown)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cli import _data_args, _device_arg, command
from .engine import Callbacks, UnlearnError
from .methods import METHODS, UnlearnConfig
from .pipeline import RunRequest, cached_dataset, execute_run
from .proxy import Cancelled

CONFIG_FLAGS = ("lr", "projector_lr", "eps", "pgd_step", "pgd_iters", "n_adv", "batch_size", "lam", "max_epochs",
                "projector_init")


def random_forget_ids(dataset: str, data_dir: str | None, k: int, seed: int) -> list[int]:
    """k training ids drawn uniformly at random (the paper's protocol), reproducible from the seed."""
    ds = cached_dataset(dataset, data_dir)
    if k < 1:
        raise UnlearnError("k must be at least 1")
    if k > len(ds.train):
        raise UnlearnError(f"k={k} is larger than the training set ({len(ds.train)} images)")
    g = torch.Generator().manual_seed(10_000 + seed)
    return sorted(ds.train.ids[torch.randperm(len(ds.train), generator=g)[:k]].tolist())


def _request_args(p: argparse.ArgumentParser) -> None:
    _data_args(p)
    _device_arg(p)
    p.add_argument("--model", default="fmnist_resnet18_narrow", help="sample model name or path to a card")
    p.add_argument("--encoder", default="auto", help="clip, minilm or auto (default)")
    p.add_argument("--clip-checkpoint", default=None, help="CLIP ViT-B-32 weights file (.pt or .safetensors)")
    p.add_argument("--anchors", default=None, help="anchor JSON file (default: assets/anchors/<dataset>.json)")
    p.add_argument("--runs-dir", default=None, help="where runs are saved (default: ./runs or $STRUCTGUARD_RUNS)")
    p.add_argument("--retain-eval", type=int, default=5000, help="retain subset size for A_r (0 = full set)")
    defaults = UnlearnConfig()
    for flag in CONFIG_FLAGS:
        kind = type(getattr(defaults, flag))
        p.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None,
                       help=f"override the per-dataset default of {flag}")
    for switch in ("sa", "sr", "cr"):
        p.add_argument(f"--no-{switch}", action="store_true", help=f"StructGuard ablation: turn {switch.upper()} off")


def _unlearn_args(p: argparse.ArgumentParser) -> None:
    _request_args(p)
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--k", type=int, default=None, help="forget k random training images")
    p.add_argument("--ids", default=None, help="file with forget ids (JSON list or one per line) instead of --k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parent", default=None, help="run directory to continue from (sequential deletion requests)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def read_ids(path: str) -> list[int]:
    text = Path(path).read_text()
    try:
        data = json.loads(text)
        data = data.get("forget_ids", data) if isinstance(data, dict) else data
    except json.JSONDecodeError:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    try:
        return [int(v) for v in data]
    except (TypeError, ValueError) as exc:
        raise UnlearnError(f"{path} must hold a list of integer ids: {exc}") from exc


def build_request(args: argparse.Namespace, method: str, k: int | None, seed: int) -> RunRequest:
    from .anchors import load_anchor_texts

    ids = read_ids(args.ids) if getattr(args, "ids", None) else random_forget_ids(args.dataset, args.data_dir, k, seed)
    overrides = {f: getattr(args, f) for f in CONFIG_FLAGS if getattr(args, f, None) is not None}
    overrides.update({s: False for s in ("sa", "sr", "cr") if getattr(args, f"no_{s}", False)})
    texts = None
    if args.anchors:
        texts = load_anchor_texts(args.anchors, cached_dataset(args.dataset, args.data_dir).class_names)
    return RunRequest(forget_ids=ids, method=method, model=args.model, parent_run=getattr(args, "parent", None),
                      dataset=args.dataset, data_dir=args.data_dir, config=overrides, seed=seed, anchor_texts=texts,
                      encoder=args.encoder, clip_checkpoint=args.clip_checkpoint, runs_root=args.runs_dir,
                      retain_eval=args.retain_eval, device=args.device)


def result_row(run_dir: Path) -> dict:
    meta = json.loads((run_dir / "run.json").read_text())
    after, before = meta["metrics"]["after"], meta["metrics"]["before"]
    return {
        "method": meta["method"], "k": meta["k"], "seed": meta["seed"],
        "forget_acc": after["forget_acc"], "retain_acc": after["retain_acc"], "test_acc": after["test_acc"],
        "retain_set": after["retain_set"],
        "structure_score": after["structure"]["affinity_cosine"],
        "cka": after["structure"]["cka"], "knn_overlap": after["structure"]["knn_overlap"],
        "dim_alignment": after["dim_alignment"],
        "before": {k: before[k] for k in ("forget_acc", "retain_acc", "test_acc")},
        "steps": meta["steps"], "stop_reason": meta["stop_reason"],
        "seconds": meta["timings"]["total"], "timings": meta["timings"], "peak_rss_mb": meta["peak_rss_mb"],
        "encoder": meta["anchors"]["encoder"], "device": meta["device"], "run_dir": str(run_dir),
    }


@command("unlearn", _unlearn_args)
def cmd_unlearn(args: argparse.Namespace) -> int:
    """Unlearn a forget set from a model and save the run."""
    if args.k is None and not args.ids:
        print("error: give --k K (random forget set) or --ids FILE", file=sys.stderr)
        return 2
    bar = None if args.json else tqdm(total=100, desc=args.method, bar_format="{l_bar}{bar}| {postfix}")

    def progress(fraction: float, message: str) -> None:
        if bar is not None:
            bar.n = int(fraction * 100)
            bar.set_postfix_str(message)

    try:
        request = build_request(args, args.method, args.k, args.seed)
        run_dir = execute_run(request, Callbacks(on_progress=progress))
    except (UnlearnError, ValueError, Cancelled) as exc:
        if bar is not None:
            bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled: nothing was saved", file=sys.stderr)
        return 130
    if bar is not None:
        bar.close()
    row = result_row(run_dir)
    if args.json:
        print(json.dumps(row))
        return 0
    print(f"\n{row['method']} k={row['k']} seed={row['seed']} on {row['device']}, anchors from {row['encoder']}")
    print(f"{'':14}{'before':>10}{'after':>10}")
    for key, name in (("forget_acc", "A_f"), ("retain_acc", "A_r"), ("test_acc", "A_test")):
        print(f"{name:14}{row['before'][key]:>9.2f}%{row[key]:>9.2f}%")
    print(f"A_r measured on the retain {row['retain_set']}")
    print(f"structure: affinity cosine {row['structure_score']:.4f}, CKA {row['cka']:.4f}, "
          f"10-NN overlap {row['knn_overlap']:.4f}; dimensional alignment {row['dim_alignment']:.4f}")
    t = row["timings"]
    evaluation = t.get("evaluation_before", 0) + t.get("evaluation", 0)
    print(f"time {row['seconds']:.1f} s (proxy {t.get('proxy', 0):.1f}, importance {t.get('importance', 0):.1f}, "
          f"updates {t.get('updates', 0):.1f}, evaluation {evaluation:.1f}); "
          f"{row['steps']} steps, stop: {row['stop_reason']}; peak RSS {row['peak_rss_mb']:.0f} MB")
    print(f"saved {run_dir}")
    return 0


# ------------------------------------------------------------------------ bench


def _bench_args(p: argparse.ArgumentParser) -> None:
    _request_args(p)
    p.add_argument("--methods", default="neggrad,adv,l2ul,structguard")
    p.add_argument("--ks", default="8,32,128")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="docs/BENCHMARKS-results.md", help="markdown table to write")
    p.add_argument("--jsonl", default=None, help="also append one JSON row per run here")


def _fmt(values: list[float]) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


@command("bench", _bench_args)
def cmd_bench(args: argparse.Namespace) -> int:
    """Run a grid of methods x k x seeds and write a markdown table (mean ± std over seeds)."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict] = []
    t0 = time.time()
    for k in ks:
        for seed in seeds:
            for method in methods:
                request = build_request(args, method, k, seed)
                run_dir = execute_run(request)
                row = result_row(run_dir)
                rows.append(row)
                tqdm.write(f"{method:12} k={k:<4} seed={seed} A_f {row['forget_acc']:6.2f} "
                           f"A_r {row['retain_acc']:6.2f} A_test {row['test_acc']:6.2f} "
                           f"struct {row['structure_score']:.3f} {row['seconds']:.0f}s")
                if args.jsonl:
                    with open(args.jsonl, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    lines = ["| k | method | A_f | A_r | A_test | affinity cos | CKA | 10-NN overlap | dim. align. | steps | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in ks:
        group = [r for r in rows if r["k"] == k]
        orig = group[0]["before"] if group else None
        if orig:
            first = [r["before"] for r in group if r["method"] == methods[0]]
            acc = [_fmt([b[c] for b in first]) for c in ("forget_acc", "retain_acc", "test_acc")]
            lines.append(f"| {k} | original | {acc[0]} | {acc[1]} | {acc[2]} | 1 | 1 | 1 | | | |")
        for method in methods:
            rs = [r for r in group if r["method"] == method]
            lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                k, method, *(_fmt([r[c] for r in rs]) for c in
                             ("forget_acc", "retain_acc", "test_acc", "structure_score", "cka", "knn_overlap",
                              "dim_alignment", "steps", "seconds"))))
    header = (f"Command: `python -m core {' '.join(sys.argv[1:])}`\n\n"
              f"Device: {rows[0]['device'] if rows else '?'}; anchors: {rows[0]['encoder'] if rows else '?'}; "
              f"A_r on the retain {rows[0]['retain_set'] if rows else '?'}; mean ± std over seeds {seeds}; "
              f"total {time.time() - t0:.0f} s.\n\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))
    return 0
