"""How much does the stopping point decide? Held-out A_r at every forgotten state of a run that goes on past its stop.

The engine stops at the first step where every forget image is misclassified. This runs a method's defaults on
bench/tune.py's held-out forget sets and lets each run go on for --window steps past that first forgotten state (the
stop rule is set out of reach and the float32 check runs after every step; the trajectory is the default's, only
longer). At every state where every forget image is misclassified it records the held-out A_r (tune.py's sample: 2,000
training images outside every forget set) and two scores a stop rule could compute without retained data: the KL
divergence from the original on fresh mixtures of forget images, and the cross-entropy on the run's proxy set. Per
set: A_r at the engine's stop, min / mean / max over the forgotten states of the window, and how well each score
ranks the states (Spearman's rho with A_r; negative is good: a lower score with a higher A_r). The test set is not read.

    python bench/forgotten_states.py --method structguard --k 128 --seeds 112,113,114,115 --window 400 \
        --out bench/results/v19/forgotten-states-k128.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from step_profile import publish  # noqa: E402
from tune import _accuracy, context  # noqa: E402

from core import engine  # noqa: E402
from core.methods import default_config, mixture_pool  # noqa: E402
from core.proxy import Cancelled  # noqa: E402
from core.train import to_device_format  # noqa: E402

UNREACHABLE = 1e9  # a stop margin no run reaches: the stop rule never fires, the window's end stops the run


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (scipy's); None with fewer than three states or no spread to rank."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def forgotten_states(method: str, k: int, seed: int, seeds: tuple[int, ...], window: int, retain: int = 2000,
                     encoder: str = "auto", overrides: dict | None = None) -> dict:
    """Run `method` on the held-out set (k, seed) until `window` steps past its first forgotten state; the states."""
    ctx = context((k,), seeds, retain, encoder)
    pos = ctx.ds.train.positions(ctx.forget[(k, seed)])
    x_f, y_f = to_device_format(ctx.ds.train.images(pos), torch.device("cpu")), ctx.ds.train.labels[pos]
    cfg = default_config(method, ctx.ds.name, k=k, **dict(overrides or {}, seed=seed, stop_margin=UNREACHABLE))
    mixtures = mixture_pool(x_f, dataclasses.replace(cfg, seed=seed + 999, mix_pairs="distinct"), y_f)[:1024]
    with torch.no_grad():
        answers = F.log_softmax(ctx.model(mixtures), 1)
    # No callback hands out the live model or the proxy set: they are caught where the engine makes them.
    seen: dict = {}
    wrap, make_proxy_set, slack = engine.wrap, engine.make_proxy_set, engine.DEFER_SLACK

    def catch_model(m: torch.nn.Module) -> engine.UnlearnedModel:
        seen["model"] = wrap(m)
        return seen["model"]

    def catch_proxies(*args, **kwargs):
        seen["proxy"] = make_proxy_set(*args, **kwargs)
        return seen["proxy"]

    states: list[dict] = []

    @torch.no_grad()
    def on_step(record: dict) -> None:
        if record.get("forget_acc") != 0.0:
            return
        live = seen["model"].eval()
        base, entry = engine.base_resnet(live), engine.base_resnet(live).entry
        base.entry = "stem"  # the steps enter at train_from; these inputs are images
        try:
            kl = F.kl_div(F.log_softmax(live(mixtures), 1), answers, log_target=True, reduction="batchmean")
            x_adv, y_adv = seen["proxy"][0], seen["proxy"][1]
            ce = sum(F.cross_entropy(live(x_adv[i:i + 512]), y_adv[i:i + 512], reduction="sum")
                     for i in range(0, len(x_adv), 512)) / len(x_adv)
            states.append({"step": record["step"], "A_r": _accuracy(live, ctx.x_r, ctx.y_r),
                           "mix_kl": float(kl), "proxy_ce": float(ce)})
        finally:
            base.entry = entry

    def past_window() -> bool:
        return bool(states) and seen.get("step", 0) >= states[0]["step"] + window

    def count(record: dict) -> None:
        seen["step"] = record["step"]
        on_step(record)

    t0 = time.perf_counter()
    engine.wrap, engine.make_proxy_set, engine.DEFER_SLACK = catch_model, catch_proxies, None
    try:
        engine.run_unlearning(ctx.model, x_f, y_f, ctx.ds.num_classes, cfg, ctx.anchors,
                              engine.Callbacks(on_step=count, should_cancel=past_window))
    except Cancelled:
        pass
    finally:
        engine.wrap, engine.make_proxy_set, engine.DEFER_SLACK = wrap, make_proxy_set, slack
    return {"k": k, "seed": seed, "window": window, "states": states, "seconds": time.perf_counter() - t0}


def summary_row(res: dict) -> str:
    s = res["states"]
    if not s:
        return f"| {res['k']} | {res['seed']} | not forgotten | | | | | | |"
    a_r = [x["A_r"] for x in s]
    rho = [spearman(a_r, [x[name] for x in s]) for name in ("mix_kl", "proxy_ce")]
    cells = ["" if r is None else f"{r:+.2f}" for r in rho]
    return (f"| {res['k']} | {res['seed']} | {s[0]['step']} | {a_r[0]:.2f} | {len(s)} | "
            f"{min(a_r):.2f} / {sum(a_r) / len(a_r):.2f} / {max(a_r):.2f} | {a_r[-1]:.2f} | {cells[0]} | {cells[1]} |")


def picks(res: dict, within: int) -> dict[str, float] | None:
    """A_r of the state three stop rules would return, going on `within` steps past the first forgotten state: that
    state itself, the last forgotten state of those steps, and the one with the lowest mixture KL (a score that
    needs no retained data). None when the run never forgot."""
    s = [x for x in res["states"] if x["step"] <= res["states"][0]["step"] + within] if res["states"] else []
    if not s:
        return None
    return {"stop": s[0]["A_r"], "last": s[-1]["A_r"], "min_kl": min(s, key=lambda x: x["mix_kl"])["A_r"]}


def picks_table(results: list[dict], windows: list[int]) -> list[str]:
    """Mean A_r over the sets (and the mean gain over the stop) for each rule and window."""
    lines = ["", "A_r of the state each rule returns, going on W steps past the first forgotten state (mean over the "
             "sets that forgot; in brackets the mean gain over the first forgotten state, and on how many sets it "
             "is higher):", "", "| W | sets | first forgotten | last forgotten within W | lowest mixture KL within W |",
             "|---|---|---|---|---|"]
    for w in windows:
        rows = [r for r in (picks(res, w) for res in results) if r is not None]
        if not rows:
            continue
        cell = {}
        for rule in ("stop", "last", "min_kl"):
            gains = [r[rule] - r["stop"] for r in rows]
            mean = sum(r[rule] for r in rows) / len(rows)
            cell[rule] = f"{mean:.2f}" if rule == "stop" else \
                f"{mean:.2f} ({sum(gains) / len(gains):+.2f}, {sum(g > 0 for g in gains)} of {len(rows)})"
        lines.append(f"| {w} | {len(rows)} | {cell['stop']} | {cell['last']} | {cell['min_kl']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--method", default="structguard")
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--seeds", default="112,113,114,115", help="held-out forget seeds (the A_r sample avoids all)")
    p.add_argument("--window", type=int, default=400, help="steps past the first forgotten state")
    p.add_argument("--retain", type=int, default=2000)
    p.add_argument("--config", default="{}", help="JSON object of UnlearnConfig overrides")
    p.add_argument("--jsonl", default=None, help="also append each set's states here")
    p.add_argument("--out", default="bench/results/forgotten-states.md")
    p.add_argument("--picks", default="50,100,200,400", help="windows (steps) for the table of stop rules")
    p.add_argument("--from-jsonl", default=None, help="no runs: the tables from the sets stored in this file "
                   "(those of --method, --k and --config's overrides as stored)")
    args = p.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    windows = [int(w) for w in args.picks.split(",")]
    lines = [f"Command: `python bench/forgotten_states.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
             "| k | seed | stop step | A_r at the stop | forgotten states in the window | A_r min / mean / max "
             "| A_r at the last | rho(mixture KL, A_r) | rho(proxy CE, A_r) |", "|---|---|---|---|---|---|---|---|---|"]
    results = []
    if args.from_jsonl:
        overrides = json.loads(args.config)
        for line in Path(args.from_jsonl).read_text().splitlines():
            res = json.loads(line)
            if (res.get("method"), res["k"], res.get("config", {})) == (args.method, args.k, overrides) \
                    and res["seed"] in seeds:
                results.append(res)
                lines.append(summary_row(res))
    for seed in seeds if not args.from_jsonl else ():
        res = forgotten_states(args.method, args.k, seed, seeds, args.window, args.retain,
                               overrides=json.loads(args.config))
        results.append(res)
        lines.append(summary_row(res))
        print(lines[-1], flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(dict(res, method=args.method, config=json.loads(args.config))) + "\n")
    return publish(args.out, lines + picks_table(results, windows))


if __name__ == "__main__":
    raise SystemExit(main())
