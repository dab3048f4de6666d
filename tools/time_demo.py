"""Time the demo's run of 16 images as a user sees it: the page in headless Chromium, Generate
clicked, the page's own "Done … in X s" read back, from `python app.py --ckpt …` in a process of its
own. Prints numbers; asserts nothing.

    python -m tools.time_demo --ckpt pretrained/cifar10.pt --runs 4    # as the page opens, then plain
    python -m tools.time_demo --ckpt pretrained/faces.pt --runs 2 --kinds page

The kinds alternate (page, plain, page, plain, …) so that a slow spell of the machine does not
land on one kind only. "page" runs the settings the page opens on (a CIFAR-10 model: its best
measured sampling, guided); "plain" first sets ancestral DDPM and w = 0 (the steps as they are).
Each run loads the page afresh. Needs Chromium (`apt-get install chromium`) and Playwright; run it with
nothing else on the CPU, as the 10 s that 16 images may take is a figure of a quiet machine.
"""

import argparse
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(page, url, server, seconds=180):
    """Load the page once app.py serves it (it loads and times the model first)."""
    deadline = time.monotonic() + seconds
    while True:
        if server.poll() is not None:
            raise SystemExit(f"error: app.py exited with status {server.returncode} before serving {url}")
        try:
            page.goto(url, timeout=10_000)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise SystemExit(f"error: app.py did not serve {url} within {seconds} s")
            time.sleep(2)


def one_run(page, url, kind):
    """Seconds of one run as the page reports it, after a fresh load (so each run starts alike)."""
    page.goto(url, timeout=60_000)
    page.get_by_text("Estimated time").wait_for(timeout=120_000)    # the model is loaded and timed
    if kind == "plain":
        page.locator("#sampler").get_by_label("DDPM", exact=True).check()
        if page.locator("#guidance").is_visible():                 # a class-conditional model
            box = page.locator("#guidance input[type=number]")
            box.fill("0")
            box.press("Enter")
        page.wait_for_timeout(1_000)                                 # the page takes the new settings
    page.locator("#generate").click()
    status = page.locator("#status")
    status.get_by_text("Done").wait_for(timeout=600_000)
    text = status.inner_text()
    return float(re.search(r"in ([0-9.]+) s", text).group(1)), text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="the checkpoint the page shows (app.py --ckpt)")
    parser.add_argument("--runs", type=int, default=4, help="runs of each kind (default: %(default)s)")
    parser.add_argument("--kinds", nargs="+", choices=("page", "plain"), default=["page", "plain"])
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser (default: %(default)s)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "app.py", "--ckpt", args.ckpt, "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times = {kind: [] for kind in args.kinds}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            wait_for_server(page, url, server)
            for _ in range(args.runs):
                for kind in args.kinds:
                    seconds, text = one_run(page, url, kind)
                    times[kind].append(seconds)
                    print(f"{kind:8s} {seconds:5.1f} s   {text}", flush=True)
            browser.close()
    finally:
        server.terminate()
        server.wait()
    for kind, values in times.items():
        print(f"{kind}: {', '.join(f'{v:.1f}' for v in values)} s (median {statistics.median(values):.1f}, "
              f"max {max(values):.1f})")


if __name__ == "__main__":
    main()
