"""Render a run's report.html in headless Chromium: a screenshot, and a check that every section and
image survived rendering (DOM dumped after load, images decoded by the browser).

Needs a Chromium binary (Debian: `apt-get install chromium`). Writes the PNG (default
docs/img/report.png) and bench/results/report_screenshot.json; exits non-zero when Chromium fails,
reports console errors, a section is missing or an image does not decode.

Usage: python bench/report_screenshot.py RUN_DIR [--out docs/img/report.png] [--height 2600]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.eval.report import SECTIONS
from imgclf.io import write_json

RESULTS = Path(__file__).parent / "results" / "report_screenshot.json"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-background-networking", "--disable-extensions", "--enable-logging=stderr", "--v=0"]  # fmt: skip
#: after load, the page reports which images decoded (naturalWidth > 0) into the DOM for --dump-dom
PROBE = """<script>addEventListener('load',()=>{const b=[...document.images].filter(i=>!i.naturalWidth).length;
document.body.setAttribute('data-broken-images',b);document.body.setAttribute('data-images',document.images.length);});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no Chromium found: apt-get install chromium")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "img" / "report.png")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2600)
    a = ap.parse_args()
    page = a.run / "report.html"
    if not page.is_file():
        raise SystemExit(f"{page}: no report (train the run or `imgclf report {a.run}` first)")
    exe = chromium()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "report.html"
        probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
        t0 = time.perf_counter()
        dom = subprocess.run([exe, *FLAGS, f"--user-data-dir={tmp}/profile", "--virtual-time-budget=5000",
                              "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)  # fmt: skip
        shot = Path(tmp) / "shot.png"
        size = f"--window-size={a.width},{a.height}"
        cap = subprocess.run([exe, *FLAGS, f"--user-data-dir={tmp}/profile", size, f"--screenshot={shot}",
                              page.as_uri()], capture_output=True, text=True, timeout=120)  # fmt: skip
        seconds = time.perf_counter() - t0
        errors = [ln for p in (dom, cap) for ln in p.stderr.splitlines() if "CONSOLE" in ln and "error" in ln.lower()]
        html = dom.stdout
        missing = [s for s in SECTIONS if f'id="{s}"' not in html]
        broken = html.split('data-broken-images="', 1)[1].split('"', 1)[0] if "data-broken-images" in html else "?"
        n_img = html.split('data-images="', 1)[1].split('"', 1)[0] if "data-images" in html else "?"
        ok = dom.returncode == 0 and cap.returncode == 0 and shot.is_file() and not errors and not missing
        ok = ok and broken == "0"
        if shot.is_file():
            arr = np.asarray(Image.open(shot).convert("L"))
            ok = ok and bool(arr.std() > 5)  # not a blank page
            a.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, a.out)
    res = {
        "run": str(a.run),
        "chromium": subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip(),
        "ok": ok,
        "sections_missing": missing,
        "images": n_img,
        "images_not_decoded": broken,
        "console_errors": errors,
        "screenshot": str(a.out),
        "seconds": round(seconds, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_json(RESULTS, res)
    print(json.dumps(res, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
