"""`python -m core unlearn`: one run (the bench, core/cli_bench.py, builds its requests the same way)."""

from __future__ import annotations

import argparse
import json
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
from .methods import METHODS, MIX_PAIRS, POLISH_PICKS, UnlearnConfig, default_config
from .models import PRECISIONS, STAGES

if TYPE_CHECKING:  # core.pipeline (the audit stack, data, runs) is imported where a run needs it
    from .pipeline import RunRequest

CONFIG_FLAGS = ("lr", "lr_decay", "late_lr", "late_below", "projector_lr", "momentum", "eps", "pgd_step", "pgd_iters",
                "n_adv", "batch_size", "lam", "max_epochs", "projector_init", "schedule", "deletion", "margin",
                "stop_margin", "polish_steps", "polish_pick", "dual_lr", "bn", "mix_weight", "mix_pairs", "train_from",
                "precision")
CHOICES = {"schedule": ("ours", "paper"), "deletion": ("hinge_dual", "hinge", "hinge_active", "masked_ce", "ce"),
           "bn": ("frozen", "train"), "projector_init": ("identity", "random"), "train_from": STAGES,
           "precision": PRECISIONS, "mix_pairs": MIX_PAIRS, "polish_pick": POLISH_PICKS}
HELP = {"schedule": "ours (default: our engine, docs/METHOD.md) or paper (the authors' loop: CE ascent, "
                    "train-mode BN, random projector, their budgets and learning rates)",
        "deletion": "deletion term: hinge_dual (the bounded hinge, its push moved to the images that resist), "
                    "hinge, hinge_active (the hinge averaged over the images it still pushes), masked_ce, or ce "
                    "(the published ascent); default: tuned per forget size (hinge_dual at k=32, hinge at k=8 "
                    "and k=128)",
        "dual_lr": "hinge_dual: how fast an image's share of the push grows while it resists",
        "lr_decay": "multiply the learning rate by this after every pass over the proxy set (1 = constant; "
                    "default: tuned per forget size; at k=32 0.95 for StructGuard and L2UL, 0.98 for Adv)",
        "late_lr": "multiply the learning rate by this once forget accuracy has fallen to --late-below percent "
                   "(1 = off; default: tuned per forget size; at k=128 0.5, docs/METHOD.md v20)",
        "late_below": "forget accuracy (percent) from which --late-lr applies (default 5)",
        "stop_margin": "stop once every forget image's true logit is this far below the best other class "
                       "(default 0: once every one is misclassified; e.g. 0.1 keeps a changed precision from "
                       "bringing one back, at the price of more steps)",
        "polish_steps": "once every forget image is misclassified, go on this many steps and return the last state "
                        "in which every one still was (default: 200 at k=128 for adv, l2ul and structguard, else "
                        "0: stop there; 100 kept +0.54 points of held-out retained accuracy at k=32 in 1.9x the "
                        "steps, docs/METHOD.md v19)",
        "polish_pick": "with --polish-steps, which state in which every forget image was misclassified the run "
                       "returns: last or mix_kl (the one whose answers on fresh mixtures of forget images are "
                       "closest to the original's; the default at k=128 for adv, l2ul and structguard, "
                       "docs/METHOD.md v21-v22)",
        "train_from": "first ResNet stage the run updates; the ones before keep the original weights and run once "
                      "per input (default: tuned per forget size; stem = every stage)",
        "bn": "backbone BatchNorm during updates: frozen (default) or train",
        "precision": "what the conv stages of the attacks and update steps compute in: auto (bfloat16 where the "
                     "CPU or GPU has it natively, else float32; the default of our engine), fp32 or bf16 "
                     "(measurements: --eval-precision)",
        "mix_weight": "weight of the retention term on mixtures of forget images (Adv, L2UL, StructGuard; "
                      "0 = off; default: tuned per forget size, docs/METHOD.md)",
        "mix_pairs": "which two forget images a mixture joins: any, distinct (never an image with itself) or "
                     "cross (two classes); default: tuned per forget size (distinct for the proxy methods at k=32)"}


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
    p.add_argument("--eval-precision", default="auto", choices=PRECISIONS,
                   help="what the conv stages compute in when measuring the retain subset, the test set and the "
                        "audit sample: auto (bfloat16 where native, else float32; default), fp32 or bf16; the "
                        "forget set is always measured in float32")
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
                      retain_eval=args.retain_eval, eval_precision=args.eval_precision,
                      device=args.device)


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
