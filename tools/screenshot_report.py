"""Screenshot an onnxforge HTML report in headless Chromium, to look at it as a person would.

    python tools/screenshot_report.py report.html -o shot.png [--width 1200 --height 2400]
    python tools/screenshot_report.py report.json -o shot.png    # renders the page first
    python tools/screenshot_report.py r.html -o docs/report.png --height 1700 --colors 64

Needs Debian's `chromium` (apt-get install chromium); the page itself loads nothing from
the network, so none is needed. Prints the PNG's size and how many plots the page has.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: apt-get install chromium")


def screenshot(page: Path, png: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [find_browser(), "--headless", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png}", page.resolve().as_uri()]
        if os.geteuid() == 0:  # Chromium refuses to run as root with its sandbox
            cmd.insert(1, "--no-sandbox")
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="report .html (or .json to render first)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--colors", type=int, default=0,
                        help="reduce the PNG to this many colors (smaller file, e.g. for docs)")
    args = parser.parse_args()
    page = args.page
    with tempfile.TemporaryDirectory() as tmp:
        if page.suffix.lower() == ".json":
            from onnxforge.html_report import load_report, write_html

            page = write_html(Path(tmp) / "report.html", load_report(page))
        text = page.read_text(encoding="utf-8")
        screenshot(page, args.output, args.width, args.height)
    if args.colors:
        from PIL import Image

        with Image.open(args.output) as image:
            small = image.convert("RGB").quantize(colors=args.colors)
        small.save(args.output, optimize=True)
    plots = len(re.findall(r"<img class=\"plot\"", text))
    tables = text.count("<table>")
    print(f"{args.output}: {args.output.stat().st_size / 1024:.0f} KiB, page with {plots} "
          f"plot(s) and {tables} table(s)")


if __name__ == "__main__":
    main()
