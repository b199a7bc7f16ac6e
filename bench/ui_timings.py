"""Dashboard timings in headless Chromium: cold start to a usable first page, and page switches after warm-up.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ui_timings.py [--cold 5] [--rounds 5] [--runs DIR]

Cold start: from launching `streamlit run dashboard/app.py` to the Start page showing the
model and dataset cards (a fresh server process each time). Page switch: click on a
navigation link until the new page's title is shown and the script has finished, after
one warm-up visit of every page. Writes bench/results/ui_timings.md (medians).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
PAGES = ["Forget set", "Anchors", "Unlearn", "Audit", "Runs", "Start"]
TITLE = {"Start": "StructGuard Studio"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str], log: Path | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (the server's life, not a block's)
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless", "true",
                             "--server.port", str(port)], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT if log else subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def wait_health(url: str, limit: float = 60) -> None:
    end = time.time() + limit
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("server did not answer /_stcore/health")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def idle(page, timeout: float = 120_000) -> None:
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout)


def usable_start(page) -> None:
    """The Start page is usable when its title and the model/dataset cards are on screen."""
    page.locator("h1", has_text="StructGuard Studio").wait_for(timeout=120_000)
    page.get_by_text("Test accuracy (card)").first.wait_for(timeout=120_000)
    page.get_by_text("Source (").first.wait_for(timeout=120_000)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", type=int, default=5, help="cold starts (fresh server each)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all pages after warm-up")
    ap.add_argument("--runs", default=None, help="runs folder to show (default: ./runs, else an empty folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ui_timings.md"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    runs = args.runs or (str(ROOT / "runs") if (ROOT / "runs").is_dir() else tempfile.mkdtemp(prefix="runs-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", STRUCTGUARD_RUNS=runs)
    cold: list[float] = []
    health: list[float] = []
    switches: dict[str, list[float]] = {p: [] for p in PAGES}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        for i in range(args.cold):
            t0 = time.perf_counter()
            proc, url = start_server(env)
            try:
                wait_health(url)
                health.append(time.perf_counter() - t0)
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url)
                usable_start(page)
                cold.append(time.perf_counter() - t0)
                print(f"cold start {i + 1}: health {health[-1]:.2f} s, usable {cold[-1]:.2f} s", flush=True)
                if i == args.cold - 1:  # the last server is used for the page switches
                    for p in PAGES:  # warm-up: every page once
                        page.locator('[data-testid="stSidebarNavLink"]', has_text=p).first.click()
                        page.locator("h1", has_text=TITLE.get(p, p)).first.wait_for(timeout=120_000)
                        idle(page)
                    for r in range(args.rounds):
                        for p in PAGES:
                            t1 = time.perf_counter()
                            page.locator('[data-testid="stSidebarNavLink"]', has_text=p).first.click()
                            page.locator("h1", has_text=TITLE.get(p, p)).first.wait_for(timeout=60_000)
                            page.wait_for_timeout(50)
                            idle(page)
                            switches[p].append(time.perf_counter() - t1)
                        print(f"round {r + 1}: " + ", ".join(f"{p} {switches[p][-1]:.2f}" for p in PAGES), flush=True)
                page.close()
            finally:
                stop(proc)
        browser.close()

    med = statistics.median
    all_sw = [v for vs in switches.values() for v in vs]
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    lines = [
        "# Dashboard UI timings",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `bench/ui_timings.py` in headless Chromium "
        f"({platform.platform()}, {os.cpu_count()} CPUs, load average at the end {load}; the machine was shared with "
        "other jobs, so these are upper bounds).",
        f"Runs folder: `{runs}`.",
        "",
        "| measure | median | min | max | n | target |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| server answers /_stcore/health | {med(health):.2f} s | {min(health):.2f} s | {max(health):.2f} s | "
        f"{len(health)} | |",
        f"| cold start to usable Start page (model + dataset cards) | {med(cold):.2f} s | {min(cold):.2f} s | "
        f"{max(cold):.2f} s | {len(cold)} | ≤ 5 s |",
        f"| page switch after warm-up, all pages | {med(all_sw):.2f} s | {min(all_sw):.2f} s | {max(all_sw):.2f} s | "
        f"{len(all_sw)} | ≤ 1 s |",
    ]
    for p in PAGES:
        v = switches[p]
        if v:
            lines.append(f"| → {p} | {med(v):.2f} s | {min(v):.2f} s | {max(v):.2f} s | {len(v)} | ≤ 1 s |")
    lines += ["", "Cold start includes Python start-up, importing torch and streamlit, loading the dataset and the "
              "sample model, and the first render in the browser."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
