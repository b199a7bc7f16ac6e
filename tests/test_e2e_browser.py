"""End-to-end: the real dashboard in headless Debian Chromium, driven by Playwright.

Walks the whole journey with the real engine: pick images, edit an anchor, run
StructGuard (small: k=4, reduced proxy and iterations), see the drift plot and a
Grad-CAM. Screenshots go to test-artifacts/. A second browser context checks that
sessions do not share selections.
"""

from __future__ import annotations

import os
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


def test_full_journey(server, browser) -> None:
    url, tmp = server
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.set_default_timeout(120_000)  # generous: the 2-core CI machine may be busy
    page.set_default_navigation_timeout(120_000)
    try:
        journey(page, browser, url, tmp)
    except Exception:
        shot(page, "failure")
        raise
    finally:
        page.close()


def journey(page, browser, url: str, tmp: Path) -> None:
    page.goto(url)
    page.locator("h1", has_text="StructGuard Studio").wait_for(timeout=300_000)
    page.get_by_text("Teaching demo").first.wait_for()
    idle(page)
    shot(page, "1-start")

    # Forget set: pick 4 images by clicking their buttons
    nav(page, "Forget set")
    page.get_by_role("button", name="select", exact=True).first.wait_for(timeout=300_000)
    for _ in range(4):
        page.get_by_role("button", name="select", exact=True).first.click()
        idle(page)
    page.get_by_text("Forget set: 4 images").wait_for()
    idle(page)
    page.wait_for_function("document.querySelectorAll('button').length > 0 && "
                           "[...document.querySelectorAll('button')].filter(b => b.innerText.includes('✓ selected'))"
                           ".length === 4")
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
    page.wait_for_timeout(1500)
    if progress.is_visible():
        progress.scroll_into_view_if_needed()
    shot(page, "4-unlearn-running")

    # The finished run opens in Audit
    page.locator("h1", has_text="Audit").wait_for(timeout=900_000)  # ~1-2 min on an idle 2-core CPU
    page.get_by_text("Forget accuracy").first.wait_for(timeout=300_000)
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
