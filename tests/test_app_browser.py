"""The demo in a real browser: headless Chromium (Debian's, driven by Playwright) loads the page,
clicks Generate, and sees the live frames and then the result grid appear.

Also the screenshots on docs/demo.md, reusable with any trained model:

    DEMO_SCREENSHOT=docs/demo.png python -m pytest -m slow tests/test_app_browser.py     # the shipped faces model

DEMO_CKPT: the checkpoint to show (default: the shipped faces model, pretrained/faces.pt, and where
there is none, a tiny random one made here, which draws noise).
DEMO_SCREENSHOT: where to save the finished page as well (it always lands in the test's tmp_path);
the page caught mid-denoising, when a live frame was caught, goes beside it as <name>_mid.png.
CHROMIUM_PATH: the browser (default /usr/bin/chromium; `apt-get install chromium` on Debian).
"""

import os
import re
import shutil
from pathlib import Path

import pytest

import app
from conftest import free_port, make_checkpoint

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
SHIPPED_FACES = Path(__file__).resolve().parent.parent / "pretrained" / "faces.pt"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.mark.slow
def test_browser_clicks_generate_and_sees_the_grid(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CHROMIUM_PATH)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    ckpt = os.environ.get("DEMO_CKPT") or (SHIPPED_FACES if SHIPPED_FACES.exists() else None)
    if ckpt is None:
        ckpt = tmp_path / "mnist_ema.pt"
        make_checkpoint(ckpt, image_size=16, timesteps=20)
    demo = app.build_demo([ckpt], "cpu")
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(url, timeout=60_000)
                page.get_by_text("Estimated time").wait_for(timeout=60_000)     # load event: model timed
                page.locator("#generate").click()
                status = page.locator("#status")
                status.get_by_text(re.compile("^(Step|Done)")).wait_for(timeout=300_000)
                mid = None
                if status.inner_text().startswith("Step"):          # a live frame: x_t and x̂_0 mid-chain
                    for panel in ("#xt", "#x0"):
                        page.locator(f"{panel} img").first.wait_for(state="visible", timeout=30_000)
                    mid = tmp_path / "demo_mid.png"
                    page.screenshot(path=str(mid), full_page=True)
                status.get_by_text("Done").wait_for(timeout=300_000)   # a real model on a CPU: minutes
                for panel in ("#xt", "#x0", "#final"):
                    image = page.locator(f"{panel} img").first
                    image.wait_for(state="visible", timeout=30_000)
                    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
                assert page.locator("#final img").first.evaluate("img => img.naturalWidth") > 0
                shot = tmp_path / "demo.png"
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        demo.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("DEMO_SCREENSHOT"):
        target = Path(os.environ["DEMO_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target)
        if mid is not None:
            shutil.copy(mid, target.with_name(f"{target.stem}_mid{target.suffix}"))
