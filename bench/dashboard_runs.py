"""Runs started from the real dashboard, in headless Chromium: their time against the same run from the
command line, and a soak of many consecutive runs in one server (issue 12, items 1 and 5).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/dashboard_runs.py [--runs 20] [--k 4] [--cli 3] [--thread]

One `streamlit run dashboard/app.py` server (the full Fashion-MNIST and the sample model, as `make run`
has them), one browser session: pick k training images on the Forget set page, then, `--runs` times,
click "Start unlearning" on the Unlearn page (StructGuard, the defaults for k with a small budget,
SMALL) and wait for the Audit page. Each dashboard run is timed from the click to the Audit page's
metrics (the user's wait) and by the run's own `execute_run` seconds (run.json). Then the same request
(the run's forget ids, method, seed and budget) runs `--cli` times as `python -m core unlearn --ids FILE
--json` in a fresh process (its wall time, imports included) on the same runs folder. The server's
memory (VmRSS of the streamlit process) is read before the first run and after each one. Writes
bench/results/dashboard_runs.md.

Run it with nothing else on the machine: the numbers are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ui_timings import ARGS, CHROMIUM, start_server, wait_health  # noqa: E402

# CLI flag -> (the Unlearn page's field, value): a small budget so that 20 runs fit in minutes
SMALL = {"--n-adv": ("Adversarial variants per forget image", "4"), "--pgd-iters": ("PGD iterations", "5"),
         "--max-epochs": ("Max epochs", "10"), "--retain-eval": ("Retain-accuracy sample", "500")}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _processes() -> list[tuple[int, int, int]]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,rss="], capture_output=True, text=True).stdout
    return [(int(a), int(b), int(c)) for a, b, c in (line.split() for line in out.splitlines() if line.strip())]


def children(pid: int) -> set[int]:
    """Every process below pid (in worker mode: the fork server and the run workers)."""
    rows, tree, grew = _processes(), {pid}, True
    while grew:
        new = {p for p, pp, _ in rows if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return tree - {pid}


def tree_rss_mb(pid: int) -> float:
    """RSS of the server and its children."""
    tree = children(pid) | {pid}
    return sum(r for p, _, r in _processes() if p in tree) / 1024


def describe_frame(direction: str, payload: bytes | str) -> str:
    """One websocket frame of the Streamlit protocol in a line (for a stuck run's record)."""
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    if isinstance(payload, str):
        return f"{direction} text {payload[:120]}"
    msg = BackMsg() if direction == "out" else ForwardMsg()
    try:
        msg.ParseFromString(payload)
    except Exception as exc:  # noqa: BLE001 (a record, not a check)
        return f"{direction} undecodable ({exc})"
    kind = msg.WhichOneof("type")
    if kind == "rerun_script":
        r = msg.rerun_script
        return (f"out rerun page={r.page_script_hash[:8]} fragment={r.fragment_id[:12] or '-'} "
                f"auto={r.is_auto_rerun}")
    if direction == "out":
        return f"out {kind}"
    meta = msg.metadata
    run = (f" [run {meta.run.script_run_id[:6]} fragments {[x[:8] for x in meta.run.fragment_ids]}]"
           if meta.HasField("run") else "")
    return f"in {_forward(kind, msg, meta)}{run}"


def _forward(kind: str, msg: Any, meta: Any) -> str:
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    if kind == "new_session":
        return f"new_session page={msg.new_session.page_script_hash[:8]}"
    if kind == "delta":
        d = msg.delta
        what = d.WhichOneof("type")
        el = d.new_element.WhichOneof("type") if what == "new_element" else ""
        text = ""
        if el == "heading":
            text = d.new_element.heading.body[:30]
        return (f"delta {list(meta.delta_path)} {what} {el} {text} page={meta.active_script_hash[:8]} "
                f"fragment={d.fragment_id[:8]}")
    if kind == "script_finished":
        return f"script_finished {ForwardMsg.ScriptFinishedStatus.Name(msg.script_finished)}"
    if kind == "auto_rerun":
        return f"auto_rerun {msg.auto_rerun.interval} {msg.auto_rerun.fragment_id[:12]}"
    if kind == "stop_auto_rerun":
        return f"stop_auto_rerun {[f[:12] for f in msg.stop_auto_rerun.fragment_ids]}"
    if kind == "navigation":
        return f"navigation page={msg.navigation.page_script_hash[:8]}"
    return kind


def idle(page, timeout: float = 120_000) -> None:
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout)


def nav(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNavLink"]', has_text=title).first.click()
    page.locator("h1", has_text=title).first.wait_for(timeout=300_000)
    idle(page)


def newest_run(root: Path, seen: set[str]) -> Path:
    new = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in seen]
    assert len(new) == 1, f"expected one new run, found {new}"
    return new[0]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20, help="consecutive dashboard runs (the soak)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--cli", type=int, default=3, help="command-line runs of the same request")
    p.add_argument("--wait", type=float, default=600, help="seconds to wait for a run's Audit page")
    p.add_argument("--thread", action="store_true", help="STRUCTGUARD_WORKER_PROCESS=0: runs in a server thread")
    p.add_argument("--max-growth", type=float, default=5.0,
                   help="MB per run: the server's RSS may grow at most this much from run 1 to the last")
    p.add_argument("--max-ratio", type=float, default=1.2, help="dashboard wall / CLI wall (medians) at most")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dashboard_runs.md"))
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="structguard-dashboard-runs-"))
    root = tmp / "runs"
    env = dict(os.environ, HF_HUB_OFFLINE="1", STRUCTGUARD_RUNS=str(root), PYTHONUNBUFFERED="1")
    env.pop("STRUCTGUARD_FASHION_DIR", None)
    env["STRUCTGUARD_WORKER_PROCESS"] = "0" if args.thread else "1"
    proc, url = start_server(env, log=tmp / "server.log")
    wait_health(url, 120)
    dash: list[dict] = []
    seen: set[str] = set()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(300_000)
            frames: collections.deque = collections.deque(maxlen=1500)  # the protocol's last words, if a run sticks

            def watch(ws) -> None:
                ws.on("framereceived", lambda p: frames.append((time.time(), "in", p)))
                ws.on("framesent", lambda p: frames.append((time.time(), "out", p)))

            page.on("websocket", watch)
            page.goto(url)
            page.locator("h1", has_text="StructGuard Studio").wait_for()
            idle(page)
            nav(page, "Forget set")
            for _ in range(args.k):
                page.get_by_role("button", name="select", exact=True).first.click()
                idle(page)
            page.get_by_text(f"Forget set: {args.k} images").wait_for()
            nav(page, "Unlearn")  # a small budget, the same on the command line below
            page.get_by_text("Evaluation", exact=True).click()
            for label, value in SMALL.values():
                box = page.get_by_role("spinbutton", name=label, exact=True)
                box.fill(value)
                box.press("Enter")
                idle(page)
            rss_start, tree_start = rss_mb(proc.pid), tree_rss_mb(proc.pid)
            for i in range(args.runs):
                nav(page, "Unlearn")
                t0 = time.perf_counter()
                page.get_by_role("button", name="Start unlearning").click()
                try:
                    page.locator("h1", has_text="Audit").wait_for(timeout=args.wait * 1000)
                except Exception:
                    shot = tmp / f"stuck-{i + 1}.png"
                    page.screenshot(path=str(shot), full_page=True)
                    t_click = time.time() - (time.perf_counter() - t0)
                    (tmp / f"stuck-{i + 1}-ws.txt").write_text("\n".join(
                        f"{t - t_click:+8.2f} {describe_frame(d, p)}" for t, d, p in list(frames)))
                    stacks = tmp / f"stuck-{i + 1}-stacks.txt"  # where the server and its children are
                    with open(stacks, "w") as f:
                        for pid in [proc.pid, *children(proc.pid)]:
                            spy = Path(sys.executable).parent / "py-spy"
                            subprocess.run([str(spy), "dump", "--locals", "--pid", str(pid)], stdout=f,
                                           stderr=subprocess.STDOUT, check=False)
                    raise RuntimeError(f"run {i + 1}: no Audit page after {args.wait} s; screenshot {shot}") from None
                page.get_by_text("Forget accuracy").first.wait_for()
                wall = time.perf_counter() - t0
                idle(page)
                run = newest_run(root, seen)
                seen.add(run.name)
                meta = json.loads((run / "run.json").read_text())
                if (meta["config"]["n_adv"], meta["config"]["pgd_iters"]) != (4, 5):
                    t_click = time.time() - (time.perf_counter() - t0)
                    (tmp / f"reset-{i + 1}-ws.txt").write_text("\n".join(
                        f"{t - t_click:+8.2f} {describe_frame(d, p)}" for t, d, p in list(frames)))
                    raise RuntimeError(f"run {i + 1}: the Unlearn page's budget was not kept; record in {tmp}")
                dash.append({"wall": wall, "execute_run": meta["timings"]["total"], "rss": rss_mb(proc.pid),
                             "tree": tree_rss_mb(proc.pid),
                             "status": meta.get("status"), "A_f": meta["metrics"]["after"]["forget_acc"],
                             "meta": meta})
                print(f"dashboard run {i + 1}: {wall:.1f} s (execute_run {meta['timings']['total']:.1f} s), "
                      f"server RSS {dash[-1]['rss']:.0f} MB (with its children {dash[-1]['tree']:.0f} MB)", flush=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(20)

    meta = dash[0]["meta"]
    ids = tmp / "ids.json"
    ids.write_text(json.dumps(meta["forget_ids"]))
    cli: list[dict] = []
    for i in range(args.cli):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "core", "unlearn", "--method", meta["method"], "--ids", str(ids),
                              "--seed", str(meta["seed"]), "--json", "--runs-dir", str(root),
                              *[x for flag, (_, value) in SMALL.items() for x in (flag, value)]], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        cli.append({"wall": time.perf_counter() - t0, "execute_run": row["timings"]["total"]})
        print(f"cli run {i + 1}: {cli[-1]['wall']:.1f} s (execute_run {row['timings']['total']:.1f} s)", flush=True)

    def med(rows: list[dict], key: str) -> str:
        vals = [r[key] for r in rows]
        return f"{statistics.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})"

    d_wall, c_wall = statistics.median(r["wall"] for r in dash), statistics.median(r["wall"] for r in cli)
    rss, tree = [r["rss"] for r in dash], [r["tree"] for r in dash]
    forget_accs = ", ".join(sorted({f"{r['A_f']:.0f}" for r in dash}))
    mode = "a thread of the server" if args.thread else "a worker process per job (the default)"
    lines = [
        "# Runs from the dashboard against the command line, and a soak", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python bench/dashboard_runs.py "
        f"{' '.join(sys.argv[1:])}` ({platform.platform()}, {os.cpu_count()} CPUs, load average at the end "
        f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())}). Dashboard runs executed in {mode}. "
        f"Request: {meta['method']}, k={meta['k']}, seed {meta['seed']}, full Fashion-MNIST, the defaults for k "
        f"with a small budget ({', '.join(f'{f} {v}' for f, (_, v) in SMALL.items())}).", "",
        "| path | n | wall s, median (min-max) | execute_run s | ratio to the CLI (wall) |",
        "| --- | --- | --- | --- | --- |",
        f"| dashboard: click to the Audit page | {len(dash)} | {med(dash, 'wall')} | {med(dash, 'execute_run')} | "
        f"{d_wall / c_wall:.2f} |",
        f"| CLI: `python -m core unlearn --ids ... --json`, fresh process | {len(cli)} | {med(cli, 'wall')} | "
        f"{med(cli, 'execute_run')} | 1 |", "",
        f"Soak: {len(dash)} consecutive runs in one server, "
        f"{sum(r['status'] == 'complete' for r in dash)} complete (A_f after: "
        f"{forget_accs} %). "
        f"Server RSS {rss_start:.0f} MB before the first run, {rss[0]:.0f} MB after it, {rss[-1]:.0f} MB after the "
        f"last (largest {max(rss):.0f} MB); growth from run 1 to run {len(dash)}: {rss[-1] - rss[0]:+.0f} MB. "
        f"With its child processes (the fork server and run workers in worker mode): "
        f"{tree_start:.0f} MB before, {tree[0]:.0f} after run 1, "
        f"{tree[-1]:.0f} after the last (largest {max(tree):.0f}).", "",
        "Per run (wall s / execute_run s / server RSS MB / with children MB): "
        + ", ".join(f"{r['wall']:.1f} / {r['execute_run']:.1f} / {r['rss']:.0f} / {r['tree']:.0f}" for r in dash), ""]
    per_run = (rss[-1] - rss[0]) / max(len(rss) - 1, 1)
    verdict = [f"every run complete: {'yes' if all(r['status'] == 'complete' for r in dash) else 'NO'}",
               f"server RSS growth {per_run:.1f} MB per run (bound {args.max_growth:g}): "
               f"{'met' if per_run <= args.max_growth else 'NOT MET'}",
               f"dashboard / CLI wall {d_wall / c_wall:.2f} (bound {args.max_ratio:g}): "
               f"{'met' if d_wall / c_wall <= args.max_ratio else 'NOT MET'}"]
    lines += ["Checks: " + "; ".join(verdict) + ".", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 1 if any("NO" in v.split(":")[-1] for v in verdict) else 0


if __name__ == "__main__":
    sys.exit(main())
