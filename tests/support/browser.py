"""MLflow's UI as a person sees it: headless Chromium renders a page; its DOM and a screenshot
are kept under tests/artifacts/."""

from __future__ import annotations

import html
import re
import subprocess
import tempfile

from tests.support import ROOT

ARTIFACTS = ROOT / "tests" / "artifacts"


# Headless, no sandbox (root in a container), no network beyond 127.0.0.1, no first-run UI.
# --run-all-compositor-stages-before-draw: without it the charts, drawn only once in view, stay
# spinners under --virtual-time-budget (seen with Chromium 156 and MLflow 3.17).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--run-all-compositor-stages-before-draw",
]


WINDOW = "--window-size=1600,1300"  # tall enough that every chart is in view: charts out of view stay spinners


RENDER_MS = 30_000  # virtual time the page gets to fetch and draw before the DOM is taken


ML = "workflowType=machine_learning"  # MLflow 3's UI opens in its GenAI view unless told otherwise


def render(chromium: str, url: str, shot: str) -> str:
    """The DOM of `url` after Chromium rendered it for RENDER_MS of virtual time (also saved
    as tests/artifacts/<shot>.html), and a screenshot of it saved as tests/artifacts/<shot>.png."""
    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / f"{shot}.png"
    png.unlink(missing_ok=True)
    # One render gives both: Chromium's headless command handler takes the DOM and the
    # screenshot of the same loaded page.
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={RENDER_MS}", WINDOW]
        dom = subprocess.run(
            [chromium, *flags, "--dump-dom", f"--screenshot={png}", url], capture_output=True, text=True, timeout=120
        )
        assert dom.returncode == 0, dom.stderr[-2000:]
    (ARTIFACTS / f"{shot}.html").write_text(dom.stdout)
    assert png.stat().st_size > 10_000, f"{png}: an empty screenshot"
    print(f"screenshot of {url}: {png}")
    return dom.stdout


def text_of(dom: str) -> str:
    """The visible text of a DOM, whitespace collapsed."""
    body = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))
