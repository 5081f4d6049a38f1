"""Open a run's report.html in a real headless browser (Chromium) and save a screenshot of the page.

Checks that the page renders offline with its plots: the screenshot is not blank, and the plots' area holds the
blue of matplotlib's first line colour (#1f77b4). Exits 3 (with the reason) where no Chromium is installed.

    .venv/bin/python benchmarks/report_screenshot.py runs/quickstart-... [--out benchmarks/results/report.png]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(report: Path, out: Path, browser: str) -> dict:
    """Render `report` headless into `out`; return what the picture shows."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no first-run state, no network needed
        # The virtual-time budget lets the page finish decoding its images before the picture is taken: on a busy
        # machine a screenshot straight after load caught the page without its plots.
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--virtual-time-budget=10000",
                        f"--user-data-dir={profile}", "--window-size=1400,2400", f"--screenshot={out}",
                        report.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    image = Image.open(out).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    plot_blue = sum(count for count, (r, g, b) in colours if abs(r - 31) < 20 and abs(g - 119) < 20 and abs(b - 180) < 20)
    return {"size": image.size, "distinct_colours": len(colours), "plot_blue_pixels": plot_blue}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="A run directory with report.html.")
    parser.add_argument("--out", default="benchmarks/results/report_screenshot.png")
    args = parser.parse_args()
    browser = find_browser()
    if browser is None:
        print("skipped: no Chromium/Chrome installed (e.g. apt-get install chromium)", file=sys.stderr)
        return 3
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seen = screenshot(Path(args.run) / "report.html", out, browser)
    print(f"{out}: {seen}")
    return 0 if seen["distinct_colours"] > 50 and seen["plot_blue_pixels"] > 500 else 1


if __name__ == "__main__":
    sys.exit(main())
