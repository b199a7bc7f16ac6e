"""End-to-end: the real dashboard in headless Debian Chromium, driven by Playwright.

Walks the whole journey with the real engine: pick images, edit an anchor, run
StructGuard (small: k=4, reduced proxy and iterations), see the drift plot and a
Grad-CAM. Screenshots go to test-artifacts/. A second browser context checks that
sessions do not share selections; two more check that runs belong to their session
(each lists and deletes only its own, a share link opens one run read-only, a copied
session URL gets a new session).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
    pytest.mark.timeout(1500),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, limit: float = 60) -> None:
    end = time.time() + limit
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("streamlit did not become healthy")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """`streamlit run dashboard/app.py` on a free port, with the small bundled dataset and a temp runs folder."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_app_pages import write_subset_idx

    from core.models import SAMPLE_MODELS, create_model, save_model

    tmp = tmp_path_factory.mktemp("e2e")
    env = dict(os.environ, HF_HUB_OFFLINE="1", STRUCTGUARD_FASHION_DIR=str(write_subset_idx(tmp / "fashion")),
               STRUCTGUARD_RUNS=str(tmp / "runs"), PYTHONUNBUFFERED="1")
    if not (SAMPLE_MODELS / "fmnist_resnet18_narrow.json").is_file():
        import torch

        torch.manual_seed(0)
        from core.data import FASHION_CLASSES

        save_model(create_model("resnet18_narrow", 10, 1), tmp / "stand_in",
                   {"arch": "resnet18_narrow", "dataset": "fashion-mnist", "class_names": FASHION_CLASSES,
                    "input_shape": [1, 28, 28]})
        env["STRUCTGUARD_MODEL"] = str(tmp / "stand_in")
    port = free_port()
    log = open(tmp / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless",
                             "true", "--server.port", str(port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.copy(tmp / "streamlit.log", ARTIFACTS / "e2e-streamlit.log") if ARTIFACTS.is_dir() else None


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        yield b
        b.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"e2e-{name}.png"), full_page=True)


def nav(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNavLink"]', has_text=title).first.click()
    page.locator("h1", has_text=title).first.wait_for(timeout=300_000)


def idle(page, timeout: float = 60_000) -> None:
    """Wait until Streamlit is not running the script (the status widget disappears)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout)


class TimerRequests:
    """Routes a page's websocket to Streamlit through Playwright, keeping each fragment-timer request the page
    sends, so that a test can deliver one late: the race of a timer that fired just before a page switch."""

    def __init__(self, page) -> None:
        self.server = None
        self.sent: list[tuple[str, str, bytes]] = []  # (page hash, fragment id, message) of each rerun request
        self.last_sent = time.monotonic()  # when the page last asked for a rerun
        self.sidebar_fragments: set[str] = set()  # fragments drawn in the sidebar (on every page)
        page.route_web_socket(re.compile(r".*/_stcore/stream$"), self._route)

    def _route(self, ws) -> None:
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        self.server = ws.connect_to_server()

        def from_page(message) -> None:
            if isinstance(message, bytes):
                msg = BackMsg()
                msg.ParseFromString(message)
                if msg.WhichOneof("type") == "rerun_script":
                    r = msg.rerun_script
                    self.sent.append((r.page_script_hash, r.fragment_id if r.is_auto_rerun else "", message))
                    self.last_sent = time.monotonic()
            self.server.send(message)

        def from_server(message) -> None:
            if isinstance(message, bytes):
                msg = ForwardMsg()
                msg.ParseFromString(message)
                if msg.WhichOneof("type") == "delta" and msg.delta.fragment_id and msg.metadata.delta_path[:1] == [1]:
                    self.sidebar_fragments.add(msg.delta.fragment_id)
            ws.send(message)

        ws.on_message(from_page)
        self.server.on_message(from_server)

    def page_hash(self) -> str:
        """The page of the page's latest request (Streamlit's hash of it)."""
        return self.sent[-1][0]

    def wait_quiet(self, page, quiet_s: float = 3.0, timeout_s: float = 60.0) -> None:
        """Wait until the page has asked for no rerun for quiet_s (the sidebar's timer stopped: jobs.SETTLE_S).

        Streamlit merges a request that arrives during a run with the next one and keeps the newer page, so a
        late request sent while the timer still fires may be absorbed by a fresh one: no race to recover from
        (a CI run failed that way). Sent to an idle server, it is handled alone."""
        end = time.monotonic() + timeout_s
        while time.monotonic() - self.last_sent < quiet_s:
            assert time.monotonic() < end, f"the page kept asking for reruns for {timeout_s:.0f} s"
            page.wait_for_timeout(250)  # Playwright delivers the routed messages while it waits

    def send_stale(self, page_hash: str) -> None:
        """Send again the last timer request of the sidebar's fragment that the page sent from page_hash.

        Handled after the switch, it runs the fragment with the old page's hash: the browser takes the old
        page for current and drops the new page's elements."""
        stale = [m for h, f, m in self.sent if f in self.sidebar_fragments and h == page_hash]
        assert stale, f"no timer request of the sidebar's fragment was recorded from page {page_hash}"
        self.server.send(stale[-1])


def test_full_journey(server, browser) -> None:
    url, tmp = server
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    timers = TimerRequests(page)
    page.set_default_timeout(120_000)  # generous: the 2-core CI machine may be busy
    page.set_default_navigation_timeout(120_000)
    try:
        journey(page, browser, url, tmp, timers)
    except Exception:
        shot(page, "failure")
        raise
    finally:
        page.close()


def journey(page, browser, url: str, tmp: Path, timers: TimerRequests) -> None:
    page.goto(url)
    page.locator("h1", has_text="StructGuard Studio").wait_for(timeout=300_000)
    page.get_by_text("Teaching demo").first.wait_for()
    idle(page)
    shot(page, "1-start")

    # Forget set: pick 4 images by clicking their buttons
    nav(page, "Forget set")
    page.get_by_role("button", name="select", exact=True).first.wait_for(timeout=300_000)
    # One click at a time, each after the previous one's rerun has drawn its "✓ selected": a script that
    # finishes before the status widget shows lets idle() return early, and a click on the stale button would
    # toggle the same image off again (a failed CI run ended with 2 of 4 selected that way).
    for n in range(1, 5):
        page.get_by_role("button", name="select", exact=True).first.click()
        page.wait_for_function("[...document.querySelectorAll('button')].filter(b => b.innerText.includes("
                               f"'✓ selected')).length === {n}")
        idle(page)
    page.get_by_text("Forget set: 4 images").wait_for()
    idle(page)
    shot(page, "2-forget-set")

    # Anchors: edit the first class's attributes
    nav(page, "Anchors")
    area = page.locator("textarea").first
    area.wait_for(timeout=300_000)
    area.fill("short sleeves\nround neckline\nlight knit cotton\nprinted logo")
    page.locator("h1").first.click()  # blur commits the text area
    page.get_by_text("T-shirt/top (edited)").wait_for(timeout=300_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=300_000)
    idle(page)
    shot(page, "3-anchors")

    # Unlearn: StructGuard, reduced proxy and iterations, watch it run
    nav(page, "Unlearn")
    page.get_by_text("Evaluation", exact=True).click()  # open the expander
    for label, value in (("Adversarial variants per forget image", "4"), ("PGD iterations", "5"),
                         ("Max epochs", "10"), ("Retain-accuracy sample", "500"), ("Audit samples per class", "10")):
        box = page.get_by_role("spinbutton", name=label, exact=True)
        box.fill(value)
        box.press("Enter")
        idle(page)
    page.get_by_role("button", name="Start unlearning").click()
    progress = page.locator('[data-testid="stProgress"]').first
    progress.wait_for(timeout=300_000)
    unlearn = timers.page_hash()
    page.wait_for_timeout(1500)
    if progress.is_visible():
        progress.scroll_into_view_if_needed()
    shot(page, "4-unlearn-running")

    # The finished run opens in Audit
    page.locator("h1", has_text="Audit").wait_for(timeout=900_000)  # ~1-2 min on an idle 2-core CPU
    page.get_by_text("Forget accuracy").first.wait_for(timeout=300_000)
    idle(page, 120_000)
    timers.wait_quiet(page)
    idle(page, 120_000)
    # A progress timer of the Unlearn page that fired just before the switch, handled after it: Streamlit
    # then tells the browser it is on Unlearn again, and the browser empties the Audit page (a rare race,
    # made certain here: the request goes alone to an idle server). The late fragment run itself opens the
    # Audit page again (widgets.recover_stale_page).
    page.evaluate("""() => { window.auditGone = false; new MutationObserver(() => {
        if (![...document.querySelectorAll('h1')].some(h => h.innerText.includes('Audit'))) window.auditGone = true;
    }).observe(document.body, {childList: true, subtree: true}); }""")
    timers.send_stale(unlearn)
    page.wait_for_function("window.auditGone", timeout=30_000)  # the race happened: the page was emptied
    page.locator("h1", has_text="Audit").wait_for(timeout=30_000)  # and it came back by itself
    page.get_by_text("Forget accuracy").first.wait_for(timeout=30_000)
    idle(page, 120_000)
    shot(page, "5-audit")
    page.locator('[data-testid="stButtonGroup"] button', has_text="Drift").first.click()
    page.get_by_text("Embedding drift").first.wait_for(timeout=180_000)
    idle(page, 180_000)
    assert page.locator(".js-plotly-plot").count() >= 2
    shot(page, "6-audit-drift")
    page.locator('[data-testid="stButtonGroup"] button', has_text="Grad-CAM").first.click()
    page.get_by_text("Grad-CAM before and after").first.wait_for(timeout=120_000)
    idle(page, 120_000)
    shot(page, "7-audit-gradcam")

    nav(page, "Runs")
    idle(page)
    assert page.get_by_text("structguard-k4").count() >= 1
    shot(page, "8-runs")
    from core.runs import list_runs

    assert [r.status for r in list_runs(tmp / "runs")] == ["complete"]

    # A second browser session sees none of the first one's selection or runs in progress
    other = browser.new_context().new_page()
    other.set_default_timeout(120_000)
    other.goto(url, timeout=120_000)
    other.locator("h1", has_text="StructGuard Studio").wait_for(timeout=300_000)
    other.get_by_text("Forget set: 0 images").wait_for(timeout=120_000)
    other.close()

    # A page opened by its own URL (a bookmark) runs inside the app: navigation titles and the session sidebar
    direct = browser.new_context().new_page()
    direct.set_default_timeout(120_000)
    direct.goto(url.rstrip("/") + "/audit", timeout=120_000)
    direct.locator("h1", has_text="Audit").wait_for(timeout=300_000)
    links = direct.locator('[data-testid="stSidebarNavLink"]').all_inner_texts()
    titles = [t.strip().splitlines()[-1] for t in links]  # each link reads "<icon name>\n\n<title>"
    assert titles == ["Start", "Forget set", "Anchors", "Unlearn", "Audit", "Runs"], links
    direct.get_by_text("This session").first.wait_for()
    direct.close()


# ---------------------------------------------------------------- runs belong to their session (issue 13, item 1)


def open_session(page, url: str) -> str:
    """Open the app in a fresh page and return its session token (?s=...)."""
    from urllib.parse import parse_qs, urlsplit

    page.set_default_timeout(120_000)
    page.goto(url, timeout=120_000)
    page.locator("h1", has_text="StructGuard Studio").wait_for(timeout=300_000)
    page.wait_for_function("new URLSearchParams(location.search).has('s')")
    idle(page)
    return parse_qs(urlsplit(page.url).query)["s"][0]


def click_row(page, row: int) -> None:
    """Toggle the selection of a row of the Runs table (its checkbox, drawn on the grid's canvas)."""
    box = page.locator('[data-testid="data-grid-canvas"]').first.bounding_box()
    page.mouse.click(box["x"] + 15, box["y"] + 35 * (row + 1) + 17)  # 35 px header and rows
    idle(page)


def shown_link(page) -> str:
    """The share link in the Audit page's popover (re-opened when the rerun after sharing closed it)."""
    code = page.locator('[data-testid="stCode"] code')
    for _ in range(6):
        idle(page)
        if code.count() and code.first.is_visible():
            return code.first.inner_text().strip()
        page.get_by_role("button", name=re.compile("Share this run")).click()
        page.wait_for_timeout(1500)
    raise AssertionError("the share link is not shown")


def delete_button(page):
    return page.get_by_role("button", name=re.compile(r"Delete 1 run"))


def copy_run_as(run: Path, root: Path, run_id: str, owner: dict) -> Path:
    """A copy of a real run under another id, recorded as `owner`'s."""
    dst = Path(shutil.copytree(run, root / run_id))
    meta = json.loads((dst / "run.json").read_text())
    (dst / "run.json").write_text(json.dumps(dict(meta, run_id=run_id, owner=owner)))
    return dst


def test_two_sessions_see_and_delete_only_their_own_runs(server, browser) -> None:
    from core import pipeline, runs

    url, tmp = server
    root = tmp / "runs"
    view = {"width": 1500, "height": 1000}
    a_ctx, b_ctx = browser.new_context(viewport=view), browser.new_context(viewport=view)
    a, b = a_ctx.new_page(), b_ctx.new_page()
    pages = {"a": a, "b": b}
    try:
        tokens = {k: open_session(p, url) for k, p in pages.items()}
        owners = {k: runs.owner_record(runs.owner_hash(runs.owner_secret(t, root))) for k, t in tokens.items()}
        # one real run (tiny budget), copied in as A's, as B's and as a command-line run
        stand_in = tmp / "stand_in"
        real = pipeline.execute_run(pipeline.RunRequest(
            forget_ids=[10, 20], method="neggrad", config={"max_epochs": 1},
            model=str(stand_in) if (stand_in.with_suffix(".json")).is_file() else "fmnist_resnet18_narrow",
            data_dir=str(tmp / "fashion"), runs_root=str(tmp / "scratch"), encoder="clip-random:ViT-S-32",
            retain_eval=200, audit_per_class=3))
        cli = copy_run_as(real, root, "20990101-000003-neggrad-k2-s0", {"kind": "cli"})
        mine = {"a": copy_run_as(real, root, "20990101-000002-neggrad-k2-s0", owners["a"]),
                "b": copy_run_as(real, root, "20990101-000001-neggrad-k2-s0", owners["b"])}

        # each session lists its own run and the CLI run (rows 1 and 0), never the other's
        for k, other in (("a", "b"), ("b", "a")):
            page = pages[k]
            nav(page, "Runs")
            idle(page)
            page.get_by_text(mine[k].name).first.wait_for(state="attached")
            assert page.get_by_text(cli.name).count() >= 1
            assert page.get_by_text(mine[other].name).count() == 0
            click_row(page, 0)  # the CLI run: read-only, no delete
            page.get_by_text("Read-only here").first.wait_for()
            assert delete_button(page).is_disabled()
            click_row(page, 0)
            shot(page, f"9-{k}-runs")

        # A shares its run from the Audit view; the link opens it read-only in another browser tab (a new session)
        click_row(a, 1)
        assert not delete_button(a).is_disabled()
        a.get_by_role("button", name="Open in Audit").click()
        a.get_by_text("origin: this session").first.wait_for(timeout=300_000)
        idle(a)
        a.get_by_role("button", name=re.compile("Share this run")).click()
        a.get_by_role("button", name="Make a share link").click()
        end = time.time() + 60
        while not (mine["a"] / runs.SHARE_FILE).is_file() and time.time() < end:
            time.sleep(0.5)
        link = shown_link(a)
        assert link.startswith(url) and f"run={mine['a'].name}" in link and (mine["a"] / runs.SHARE_FILE).is_file()
        shot(a, "10-a-share")
        visitor = b_ctx.new_page()
        visitor.set_default_timeout(120_000)
        visitor.goto(link, timeout=120_000)
        visitor.locator("h1", has_text="Audit").wait_for(timeout=300_000)
        visitor.get_by_text("origin: shared by another session (read-only)").first.wait_for(timeout=300_000)
        idle(visitor)
        download = visitor.get_by_role("button", name=re.compile("Download weights"))
        download.first.wait_for()  # drawn after the caption: wait, the page may still be running
        assert download.count() == 1
        assert visitor.get_by_role("button", name=re.compile("Share this run")).count() == 0
        assert "key=" not in visitor.url
        shot(visitor, "11-shared-audit")
        nav(visitor, "Runs")
        idle(visitor)
        visitor.get_by_text(mine["a"].name).first.wait_for(state="attached")
        assert visitor.get_by_text(mine["b"].name).count() == 0  # B's first tab is another session
        click_row(visitor, 1)  # the shared run: read-only
        visitor.get_by_text("Read-only here").first.wait_for()
        assert delete_button(visitor).is_disabled()
        visitor.close()

        # a copy of A's address, opened while A's page is open, is a new, empty session
        copy = browser.new_context(viewport=view).new_page()
        assert open_session(copy, f"{url}/?s={tokens['a']}") != tokens["a"]
        copy.get_by_text("belongs to a session that is open elsewhere").first.wait_for()
        nav(copy, "Runs")
        idle(copy)
        assert copy.get_by_text(mine["a"].name).count() == 0 and copy.get_by_text(mine["b"].name).count() == 0
        copy.close()

        # A deletes its own run; B's and the CLI run stay
        nav(a, "Runs")
        idle(a)
        for _ in range(3):  # the table may come back with the run picked before, with none, or lose a click
            if not mine["a"].exists():
                break
            if delete_button(a).count() == 0 or delete_button(a).is_disabled():
                click_row(a, 1)  # rows newest id first: the CLI run (000003), then A's own (000002)
            if delete_button(a).count() == 0 or delete_button(a).is_disabled():
                continue
            delete_button(a).click()
            a.get_by_role("button", name="Delete for good").click()
            idle(a)
            end = time.time() + 20
            while mine["a"].exists() and time.time() < end:
                time.sleep(0.5)
        assert not mine["a"].exists() and mine["b"].is_dir() and cli.is_dir()
        nav(b, "Runs")
        idle(b)
        b.get_by_text(mine["b"].name).first.wait_for(state="attached")
    except Exception:
        for k, p in pages.items():
            shot(p, f"failure-{k}")
        raise
    finally:
        a_ctx.close()
        b_ctx.close()
