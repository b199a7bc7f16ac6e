"""`python -m core unlearn` (one run) and `python -m core bench` (a grid of runs -> markdown)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from . import runs
from .anchors import DATASET_CLASSES, load_anchor_texts
from .cli import _data_args, _device_arg, check_model, command
from .encoders import ENCODER_NAMES, EncoderError
from .engine import Callbacks, UnlearnError
from .forget_ids import read_forget_ids_file
from .methods import METHODS, UnlearnConfig, default_config

if TYPE_CHECKING:  # core.pipeline pulls in the audit stack (scikit-learn): imported where a run needs it
    from .pipeline import RunRequest

CONFIG_FLAGS = ("lr", "projector_lr", "momentum", "eps", "pgd_step", "pgd_iters", "n_adv", "batch_size", "lam",
                "max_epochs", "projector_init", "schedule", "deletion", "margin", "bn", "mix_weight")
CHOICES = {"schedule": ("ours", "paper"), "deletion": ("hinge", "hinge_active", "masked_ce", "ce"),
           "bn": ("frozen", "train"), "projector_init": ("identity", "random")}
HELP = {"schedule": "ours (default: engine v2) or paper (the authors' loop: CE ascent, train-mode BN, random "
                    "projector, their budgets and learning rates)",
        "deletion": "deletion term: hinge (bounded, default), hinge_active (the hinge averaged over the images "
                    "it still pushes), masked_ce, or ce (the published ascent)",
        "bn": "backbone BatchNorm during updates: frozen (default) or train",
        "mix_weight": "weight of the retention term on mixtures of forget images (Adv, L2UL, StructGuard; "
                      "0 = off; default: tuned per forget size, docs/METHOD.md)"}


def random_forget_ids(dataset: str, data_dir: str | None, k: int, seed: int) -> list[int]:
    """k training ids drawn uniformly at random (the paper's protocol), reproducible from the seed."""
    from .pipeline import cached_dataset

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
        p.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None, choices=CHOICES.get(flag),
                       help=HELP.get(flag, f"override the default of {flag} (per dataset and forget size)"))
    for switch in ("sa", "sr", "cr"):
        p.add_argument(f"--no-{switch}", action="store_true", help=f"StructGuard ablation: turn {switch.upper()} off")


def _unlearn_args(p: argparse.ArgumentParser) -> None:
    _request_args(p)
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--k", type=int, default=None, help="forget k random training images")
    p.add_argument("--ids", default=None, help="file with forget ids instead of --k: a JSON list, the dashboard's "
                                               "saved forget set, or one id per line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parent", default=None, help="run directory to continue from (sequential deletion requests)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def check_encoder_name(name: str) -> None:
    """The names core.encoders.get_encoder accepts, checked without loading any weights (that takes seconds)."""
    name = (name or "auto").strip()
    if name not in ("auto", "clip", "minilm") and not name.startswith(("clip:", "clip-random:")):
        raise EncoderError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODER_NAMES)}")


def build_request(args: argparse.Namespace, method: str, k: int | None, seed: int) -> RunRequest:
    """The run request; the user's inputs are checked cheapest first, so a mistake is reported before the
    dataset loads where it can be (core.pipeline checks them all again)."""
    id_file = read_forget_ids_file(args.ids) if getattr(args, "ids", None) else None
    check_encoder_name(args.encoder)
    parent = getattr(args, "parent", None)
    if parent:
        try:
            runs.check_run(parent)
        except runs.RunError as exc:
            raise runs.RunError(f"--parent: {exc}") from exc
    else:
        check_model(args.model)
    overrides = {f: getattr(args, f) for f in CONFIG_FLAGS if getattr(args, f, None) is not None}
    overrides.update({s: False for s in ("sa", "sr", "cr") if getattr(args, f"no_{s}", False)})
    try:
        default_config(method, args.dataset, k=len(id_file.ids) if id_file else k, **dict(overrides, seed=seed))
    except ValueError as exc:
        raise UnlearnError(f"{exc}; change that option") from None
    texts = None
    known = DATASET_CLASSES.get(args.dataset)  # shipped datasets: the anchor file is checked before the data loads
    if args.anchors and known:
        texts = load_anchor_texts(args.anchors, known)
    from .pipeline import RunRequest, cached_dataset  # only now: the checks above need none of the audit stack

    ds = cached_dataset(args.dataset, args.data_dir)
    if args.anchors and not known:
        texts = load_anchor_texts(args.anchors, ds.class_names)
    ids = id_file.ids_for(ds.name) if id_file else random_forget_ids(args.dataset, args.data_dir, k, seed)
    return RunRequest(forget_ids=ids, method=method, model=args.model, parent_run=parent,
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
    from .pipeline import execute_run

    if (args.k is None) == (args.ids is None):
        print("error: give --k K (random forget set) or --ids FILE, not both", file=sys.stderr)
        return 2
    request = build_request(args, args.method, args.k, args.seed)
    # A terminal only (disable=None), and erased when done (leave=False): an error stays the one line on stderr.
    bar = None if args.json else tqdm(total=100, desc=args.method, bar_format="{l_bar}{bar}| {postfix}",
                                      disable=None, leave=False)

    def progress(fraction: float, message: str) -> None:
        if bar is not None:
            bar.n = int(fraction * 100)
            bar.set_postfix_str(message)

    try:
        with bar if bar is not None else nullcontext():
            run_dir = execute_run(request, Callbacks(on_progress=progress))
    except KeyboardInterrupt:
        print("cancelled: nothing was saved", file=sys.stderr)
        return 130
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

# Bench variants: "method" or "method:variant"; each variant is a set of config overrides.
VARIANTS: dict[str, dict] = {"": {}, "paper": {"schedule": "paper"}, "no-sa": {"sa": False},
                             "no-sr": {"sr": False}, "no-cr": {"cr": False}, "no-mix": {"mix_weight": 0.0}}
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def _bench_args(p: argparse.ArgumentParser) -> None:
    _request_args(p)
    p.add_argument("--methods", default="neggrad,adv,l2ul,structguard,structguard:paper,structguard:no-sa,"
                                        "structguard:no-sr,structguard:no-cr",
                   help="methods, each optionally with a variant: " + ", ".join(v for v in VARIANTS if v))
    p.add_argument("--ks", default="8,32,128")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="docs/BENCHMARKS-results.md", help="markdown table to write")
    p.add_argument("--jsonl", default=None, help="also append one JSON row per run here")
    p.add_argument("--from-jsonl", default=None, help="run nothing: write the table from rows saved with --jsonl "
                                                      "(for example by several bench processes)")


def _fmt(values: list[float], ci: bool = False, digits: int = 2) -> str:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    mean, sd = statistics.mean(vals), statistics.stdev(vals)
    text = f"{mean:.{digits}f} ± {sd:.{digits}f}"
    if ci:
        half = T95.get(len(vals), 1.96) * sd / len(vals) ** 0.5
        text += f" [{mean - half:.{digits}f}, {mean + half:.{digits}f}]"
    return text


def _variant(spec: str) -> tuple[str, dict]:
    method, _, variant = spec.partition(":")
    if method not in METHODS or variant not in VARIANTS:
        raise UnlearnError(f"unknown bench entry {spec!r}: use a method ({', '.join(METHODS)}) optionally "
                           f"followed by :{', :'.join(v for v in VARIANTS if v)}")
    return method, VARIANTS[variant]


def bench_row(run_dir: Path, label: str) -> dict:
    meta = json.loads((run_dir / "run.json").read_text())
    row = dict(result_row(run_dir), label=label)
    ref = meta["metrics"].get("retrain")
    row["retrain"] = ref and {k: ref[k] for k in ("forget_acc", "retain_acc", "test_acc")}
    row["tug_of_war"] = ref["tug_of_war"] if ref else None
    row["gap_test"] = ref["gap"]["test_acc"] if ref else None
    row["mia"] = ref["mia_forget_member_rate"] if ref else None
    row["term_shares"], row["importance"] = meta.get("term_shares"), meta.get("importance")
    return row


def bench_table(rows: list[dict], labels: list[str], ks: list[int]) -> list[str]:
    """Mean ± std (A_test also its 95% t-interval) over seeds, per k and method, with the references."""
    lines = ["| k | method | A_f | A_r | A_test [95% CI] | A_test - retrain | Tug-of-War | MIA forget member rate | "
             "affinity cos | forgot | steps | seconds (proxy / importance / updates / eval) | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in ks:
        group = [r for r in rows if r["k"] == k]
        if not group:
            continue
        firsts = [r for r in group if r["label"] == group[0]["label"]]
        # the original's numbers differ across seeds only in A_f (another forget set) and A_r (another retain rest)
        accs = [_fmt(v[:1] if len(set(v)) == 1 else v)
                for v in ([r["before"][c] for r in firsts] for c in ("forget_acc", "retain_acc", "test_acc"))]
        lines.append(f"| {k} | original | {accs[0]} | {accs[1]} | {accs[2]} | | | | 1 | | | | |")
        refs = [r for r in firsts if r["retrain"]]
        if refs:
            accs = [_fmt([r["retrain"][c] for r in refs]) for c in ("forget_acc", "retain_acc", "test_acc")]
            lines.append(f"| {k} | retrain ({len(refs)} of {len(firsts)} seeds) | {accs[0]} | {accs[1]} | {accs[2]} "
                         f"| 0 | 1 | {_fmt([r['mia']['retrain'] for r in refs])} | | | | | |")
        for label in labels:
            rs = [r for r in group if r["label"] == label]
            if not rs:
                continue
            t = [r["timings"] for r in rs]
            phases = [[x.get("proxy") for x in t], [x.get("importance") for x in t], [x.get("updates") for x in t],
                      [x.get("evaluation", 0) + x.get("evaluation_before", 0) for x in t]]
            secs = f"{_fmt([r['seconds'] for r in rs], digits=1)} (" + " / ".join(
                _fmt(v, digits=1) for v in phases) + ")"
            forgot = sum(r["forget_acc"] == 0.0 for r in rs)
            lines.append(
                f"| {k} | {label} | {_fmt([r['forget_acc'] for r in rs])} | {_fmt([r['retain_acc'] for r in rs])} | "
                f"{_fmt([r['test_acc'] for r in rs], ci=True)} | {_fmt([r['gap_test'] for r in rs])} | "
                f"{_fmt([r['tug_of_war'] for r in rs], digits=3)} | "
                f"{_fmt([r['mia']['unlearned'] if r['mia'] else None for r in rs])} | "
                f"{_fmt([r['structure_score'] for r in rs], digits=3)} | {forgot}/{len(rs)} | "
                f"{_fmt([r['steps'] for r in rs], digits=0)} | {secs} | {max(r['peak_rss_mb'] for r in rs):.0f} |")
    return lines


@command("bench", _bench_args)
def cmd_bench(args: argparse.Namespace) -> int:
    """Run a grid of methods (and variants) x k x seeds; write a markdown table (mean ± std over seeds)."""
    from .pipeline import execute_run

    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    variants = {label: _variant(label) for label in labels}
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict] = []
    if args.from_jsonl:
        saved = [json.loads(line) for line in Path(args.from_jsonl).read_text().splitlines() if line.strip()]
        rows = [r for r in saved if r["k"] in ks and r["seed"] in seeds and r.get("label") in labels]
        ks = []  # the loop below runs nothing
    for k in ks:
        for seed in seeds:
            for label in labels:
                method, overrides = variants[label]
                request = build_request(args, method, k, seed)
                request.config = dict(request.config, **overrides)
                row = bench_row(execute_run(request), label)
                rows.append(row)
                tqdm.write(f"{label:20} k={k:<4} seed={seed} A_f {row['forget_acc']:6.2f} "
                           f"A_r {row['retain_acc']:6.2f} A_test {row['test_acc']:6.2f} "
                           f"ToW {row['tug_of_war'] if row['tug_of_war'] is not None else float('nan'):.3f} "
                           f"steps {row['steps']} {row['seconds']:.0f}s")
                if args.jsonl:
                    with open(args.jsonl, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    first = rows[0] if rows else {}
    header = (f"Command: `python -m core {' '.join(sys.argv[1:])}`\n\n"
              f"Device: {first.get('device', '?')}; torch threads: {torch.get_num_threads()}; anchors: "
              f"{first.get('encoder', '?')}; A_r on the retain {first.get('retain_set', '?')}; mean ± std over "
              f"seeds {seeds} (A_test also its 95% t-interval); retrain: the base recipe trained without the forget "
              f"set (bench/retrain), where one exists; runs took {sum(r['seconds'] for r in rows):.0f} s in all.\n\n")
    text = header + "\n".join(bench_table(rows, labels, sorted({r["k"] for r in rows}))) + "\n"
    runs.write_atomic(Path(args.out), text, what="the bench table")
    print(text)
    return 0
