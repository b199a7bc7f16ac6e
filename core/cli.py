"""Argument parsing for `python -m core`; each sub-command is a small function."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from .anchors import AnchorError
from .anchors_llm import LLMError
from .data import DataError, load_dataset
from .downloads import env_flag
from .encoders import EncoderError
from .engine import UnlearnError
from .forget_ids import ForgetIdsError, read_forget_ids_file
from .models import SAMPLE_MODELS, ModelError, list_models, list_sample_models, load_model, pick_device, save_model
from .runs import RunError, clean_partials_once, dismiss_interrupted, interrupted_runs
from .sweep import SweepError
from .train import TrainConfig, accuracy, prepare_model, train_classifier

# Errors a user causes (a bad path, file, name or choice): one line on stderr and exit code 2.
# Anything else is a bug and keeps its traceback; STRUCTGUARD_DEBUG=1 (or true, yes, on) shows it for these too.
USER_ERRORS = (AnchorError, DataError, EncoderError, ForgetIdsError, LLMError, ModelError, RunError, SweepError,
               UnlearnError, FileNotFoundError)

COMMANDS: dict[str, tuple[callable, callable]] = {}


def command(name: str, add_args):
    def wrap(fn):
        COMMANDS[name] = (fn, add_args)
        return fn
    return wrap


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, cifar10, cifar100 or folder")
    p.add_argument("--data-dir", default=None, help="where the dataset lives (default: auto-detect)")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def check_model(name_or_path: str) -> None:
    """Refuse a model name that is neither a sample model nor a card path, before any data is loaded."""
    path = Path(name_or_path)
    if path.exists() or path.with_suffix(".json").is_file() or (SAMPLE_MODELS / f"{name_or_path}.json").is_file():
        return
    samples = ", ".join(c["name"] for c in list_sample_models()) or "none installed"
    raise ModelError(f"unknown model {name_or_path!r}: no sample model of that name ({samples}) and no model card "
                     f"{path.with_suffix('.json')}; give a sample model name or the path to a model card")


# ------------------------------------------------------------------------- info


def _info_args(p: argparse.ArgumentParser) -> None:
    _data_args(p)
    p.add_argument("--json", action="store_true")


@command("info", _info_args)
def cmd_info(args: argparse.Namespace) -> int:
    from .encoders import encoder_status

    info: dict = {"device": str(pick_device()), "torch": torch.__version__,
                  "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "architectures": list_models()}
    try:
        info["dataset"] = load_dataset(args.dataset, args.data_dir).card()
    except DataError as exc:
        info["dataset"] = {"error": str(exc)}
    info["sample_models"] = [{"name": c["name"], "arch": c["arch"], "dataset": c.get("dataset"),
                              "test_accuracy": c.get("test_accuracy"), "test_set": c.get("test_set")}
                             for c in list_sample_models()]
    info["encoders"] = encoder_status()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"device      {info['device']}" + (f" ({info['cuda']})" if info["cuda"] else "") + f", torch {info['torch']}")
    ds = info["dataset"]
    if "error" in ds:
        print(f"dataset     unavailable:\n{ds['error']}")
    else:
        print(f"dataset     {ds['name']} from {ds['source_kind']} ({ds['source']}): "
              f"{ds['train_size']} train / {ds['test_size']} test{'' if ds['full'] else ' (subset)'}")
    for m in info["sample_models"]:
        acc = "unknown" if m["test_accuracy"] is None else f"{m['test_accuracy']:.2f}%"
        print(f"model       {m['name']}: {m['arch']} on {m['dataset']}, test accuracy {acc} ({m['test_set']})")
    for e in info["encoders"]:
        print(f"encoder     {e['name']}: {'available' if e['available'] else 'unavailable'} - {e['detail']}")
    print(f"archs       {', '.join(info['architectures'])}")
    return 0


# ------------------------------------------------------------------------ train


def _train_args(p: argparse.ArgumentParser) -> None:
    _data_args(p)
    _device_arg(p)
    defaults = TrainConfig()
    p.add_argument("--arch", default=defaults.arch, choices=list_models())
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--out", required=True, help="output path without extension, e.g. sample_models/my_model")


@command("train", _train_args)
def cmd_train(args: argparse.Namespace) -> int:
    ds = load_dataset(args.dataset, args.data_dir)
    if not ds.full:
        print(f"warning: training on {ds.source_kind} data ({len(ds.train)} images), not the full set", file=sys.stderr)
    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    device = pick_device(args.device)
    model, log = train_classifier(ds, cfg, device)
    acc = accuracy(model, ds.test)
    card = {
        "arch": cfg.arch, "dataset": ds.name, "class_names": ds.class_names, "input_shape": list(ds.input_shape),
        "mean": model.mean.flatten().tolist()[:1] if ds.input_shape[0] == 1 else model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist()[:1] if ds.input_shape[0] == 1 else model.std.flatten().tolist(),
        "feature_dim": model.feature_dim, "test_accuracy": acc,
        "test_set": f"{ds.name} test, {len(ds.test)} images ({'full' if ds.full else ds.source_kind})",
        "trained_on": f"{ds.name} train, {len(ds.train)} images from {ds.source_kind}",
        "training": {"command": "python -m core " + shlex.join(sys.argv[1:]), "seed": cfg.seed,
                     "config": cfg.__dict__, "seconds": round(log["seconds"], 1), "device": log["device"],
                     "torch": torch.__version__, "history": log["history"]},
    }
    card = save_model(model.cpu().to(memory_format=torch.contiguous_format), args.out, card)
    print(f"saved {args.out}.safetensors ({card['weights_sha256'][:12]}), test accuracy {acc:.2f}% "
          f"in {log['seconds']:.0f} s on {log['device']}")
    return 0


# ---------------------------------------------------------------------- retrain


def _retrain_args(p: argparse.ArgumentParser) -> None:
    _data_args(p)
    _device_arg(p)
    p.add_argument("--model", default="fmnist_resnet18_narrow", help="base model whose recipe is retrained")
    p.add_argument("--ids", default=None, help="file with the forget ids (JSON list or one per line)")
    p.add_argument("--k", type=int, default=None, help="or: the bench's random forget set of size k ...")
    p.add_argument("--forget-seed", type=int, default=0, help="... drawn with this seed (as `unlearn --k --seed`)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: the base model's)")
    p.add_argument("--out", default=None, help="output path without extension (default: bench/retrain/...)")


@command("retrain", _retrain_args)
def cmd_retrain(args: argparse.Namespace) -> int:
    """Retrain the base model's recipe from scratch without the forget set (the reference)."""
    from .cli_unlearn import random_forget_ids
    from .retrain import ids_hash, retrain, retrain_dir, save_retrained

    if (args.ids is None) == (args.k is None):
        print("error: give --ids FILE or --k K (with --forget-seed S)", file=sys.stderr)
        return 2
    id_file = read_forget_ids_file(args.ids) if args.ids else None
    check_model(args.model)
    ds = load_dataset(args.dataset, args.data_dir)
    ids = id_file.ids_for(ds.name) if id_file else random_forget_ids(args.dataset, args.data_dir, args.k,
                                                                     args.forget_seed)
    base = load_model(args.model)
    if not ds.full:
        print(f"warning: retraining on {ds.source_kind} data ({len(ds.train)} images), not the full set",
              file=sys.stderr)
    name = Path(args.model).stem
    tag = f"k{args.k}-seed{args.forget_seed}" if args.k is not None else f"ids-{ids_hash(ids)}"
    out = args.out or str(retrain_dir() / name / tag)
    model, card = retrain(ds, base, ids, pick_device(args.device), args.seed)
    card["training"]["command"] = "python -m core " + shlex.join(sys.argv[1:])
    card = save_retrained(model, card, out)
    print(f"saved {out}.safetensors: {len(ids)} ids left out, test accuracy {card['test_accuracy']:.2f}% "
          f"in {card['training']['seconds']:.0f} s on {card['training']['device']} "
          f"({card['training']['threads']} threads)")
    return 0


# --------------------------------------------------------------------- evaluate


def _eval_args(p: argparse.ArgumentParser) -> None:
    _data_args(p)
    _device_arg(p)
    p.add_argument("--model", required=True, help="sample model name or path to a card/weights")
    p.add_argument("--json", action="store_true")


@command("evaluate", _eval_args)
def cmd_evaluate(args: argparse.Namespace) -> int:
    check_model(args.model)
    loaded = load_model(args.model)
    ds = load_dataset(loaded.card.get("dataset", args.dataset) if args.dataset == "fashion-mnist" else args.dataset,
                      args.data_dir)
    want = (len(loaded.card["class_names"]), loaded.card["input_shape"][0])
    if want != (ds.num_classes, ds.input_shape[0]):
        raise ModelError(f"{args.model} expects {want[0]} classes and {want[1]} channel(s), but {ds.name} has "
                         f"{ds.num_classes} classes and {ds.input_shape[0]} channel(s); pick the matching --dataset")
    device = pick_device(args.device)
    model = prepare_model(loaded.model, device)
    t0 = time.time()
    acc = accuracy(model, ds.test)
    seconds = time.time() - t0
    result = {"model": args.model, "test_acc": acc, "test_set": "full" if ds.full else "subset",
              "test_size": len(ds.test), "source": ds.source_kind, "seconds": seconds, "device": str(device)}
    if args.json:
        print(json.dumps(result))
    else:
        which = "the full test set" if ds.full else f"the {ds.source_kind} test subset"
        print(f"{args.model}: {acc:.2f}% on {which} ({len(ds.test)} images from {ds.source}), "
              f"{seconds:.1f} s on {device}")
    return 0


# ------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    _load_optional_commands()
    parser = argparse.ArgumentParser(prog="python -m core", description="StructGuard Studio engine")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, (fn, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def _load_optional_commands() -> None:
    """Sub-commands that live in their own modules register themselves on import."""
    import importlib

    for mod in ("core.cli_unlearn", "core.cli_bench", "core.cli_report", "core.cli_anchors"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def _check_data_dir(args: argparse.Namespace) -> None:
    """A --data-dir that does not exist is a typo: refuse it rather than fall back to another copy of the data."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir and not Path(data_dir).expanduser().exists():
        raise DataError(f"--data-dir {data_dir} does not exist; check the path, or leave it out to use the "
                        "default location")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename} does not exist; check the path"
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; a user error is one line on stderr and exit code 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        _check_data_dir(args)
        if "runs_dir" in args:  # the commands that write runs: clear what killed runs left behind
            clean_partials_once(args.runs_dir)
            for item in interrupted_runs(args.runs_dir, cli=True):  # said once, then forgotten
                print(f"note: {item.describe()}", file=sys.stderr)
                dismiss_interrupted(item)
        return args.func(args) or 0
    except USER_ERRORS as exc:
        if env_flag("STRUCTGUARD_DEBUG"):
            traceback.print_exc()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
