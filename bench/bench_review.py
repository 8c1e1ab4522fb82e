"""A scripted review session: 10 queue patches corrected with the wand and the brush in headless Chromium against
a real app server, as a reviewer would with the keyboard. Reports user actions and seconds of UI time per
corrected patch (inputs to the saved version and the next patch on screen), beside the previous tools' counts
(rectangle: 5 actions, polygon: 8+) and the raw bound: the same edits made through the core in the same run.

    python bench/bench_review.py [--patches 10]

Needs Debian's chromium (tests/apps/_browser.py); skips cleanly without it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _sample_project import SAMPLE_GEOJSON, SAMPLE_SVS, table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "apps"))

OUTLINE = ".slideloop-map path[stroke='#ffd400']"
TIMEOUT = 90_000


def _message_has(page, text: str) -> None:
    try:
        page.wait_for_function("t => document.querySelector('.slideloop-message').innerText.includes(t)",
                               arg=text, timeout=TIMEOUT)
    except Exception as err:
        page.screenshot(path=str(Path(tempfile.gettempdir()) / "bench-review-stuck.png"))
        raise SystemExit(f"waited for {text!r}; the page says {page.inner_text('.slideloop-message')!r}") from err


def _settled(page) -> dict:
    """The patch outline once the map stopped moving (two equal reads 100 ms apart: part of the UI time)."""
    last = None
    while True:
        page.wait_for_timeout(100)
        now = page.locator(OUTLINE).bounding_box()
        if now is not None and now == last:
            return now
        last = now


def _project(tmp: Path) -> Path:
    from al_core.project.project import Project
    from al_core.wsi.grid import GridSpec

    root = tmp / "proj"
    with Project.create(root, ["Epithelium:#c80000"]) as proj:  # what `slideloop demo` builds
        proj.add_slide(shutil.copy(SAMPLE_SVS, tmp / SAMPLE_SVS.name))
        proj.build_grid(GridSpec(patch=256))
        proj.import_labels(SAMPLE_GEOJSON)
    return root.resolve()


def _session(root: Path, tmp: Path, n: int) -> list[dict[str, object]]:
    from _browser import app_server, browser_page

    rows = []
    with app_server(root, tmp) as srv, browser_page((1600, 1000)) as (page, _):
        page.goto(srv.app_url())
        page.wait_for_selector(".slideloop-tools-canvas", state="attached", timeout=TIMEOUT)
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/']", timeout=TIMEOUT)
        page.mouse.click(5, 5)
        page.keyboard.press("n")  # once: after that, Save goes on to the next patch
        page.wait_for_selector(OUTLINE, timeout=TIMEOUT)
        outline = _settled(page)
        for i in range(n):
            tool = "wand" if i % 2 == 0 else "brush"
            cx, cy = outline["x"] + outline["width"] / 2, outline["y"] + outline["height"] / 2
            t0 = time.perf_counter()
            page.keyboard.press("w" if tool == "wand" else "b")  # 1: the tool
            if tool == "wand":
                page.mouse.click(cx, cy)  # 2: a click on the region
                _message_has(page, "Wand selection")
            else:
                page.mouse.move(cx - 60, cy)  # 2: one stroke
                page.mouse.down()
                page.mouse.move(cx + 60, cy + 20, steps=12)
                page.mouse.up()
                _message_has(page, "to save")
            page.keyboard.press("s")  # 3: save (and on to the next patch)
            _message_has(page, "Saved label version")
            outline = _settled(page)
            rows.append({"patch": i + 1, "tool": tool, "actions": 3, "ui_s": time.perf_counter() - t0})
    return rows


def _raw_bound(root: Path, n: int) -> float:
    """Seconds per patch for the same kind of edits straight through the core (no browser, no kernel)."""
    from al_core.project.label_edits import brush_region, wand_at
    from al_core.project.project import Project

    with Project.open(root) as proj:
        patches = proj.patches()[:n]
        mpp = proj.slide_row(1).mpp
        t0 = time.perf_counter()
        with proj.open_slide(1) as slide:
            for i, p in enumerate(patches):
                cx, cy = p.x + p.size / 2, p.y + p.size / 2
                region = wand_at(slide, cx, cy, 1.2) if i % 2 == 0 else \
                    brush_region([(cx - 70, cy), (cx + 70, cy + 25)], 8, mpp)
                proj.correct(1, region, 1, author="bench", patch_id=p.id)
        return (time.perf_counter() - t0) / max(1, len(patches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=10)
    args = parser.parse_args()
    if not Path("/usr/bin/chromium").exists():
        print("skipped: no /usr/bin/chromium")
        return
    tmp = Path(tempfile.mkdtemp(prefix="slideloop-bench-review-"))
    rows = _session(_project(tmp), tmp, args.patches)
    (tmp / "raw").mkdir()
    raw = _raw_bound(_project(tmp / "raw"), args.patches)
    secs = [float(str(r["ui_s"])) for r in rows]
    print(table(rows))
    print()
    med = statistics.median(secs)
    print(table([
        {"tools": "wand / brush + keys (this run)", "actions/patch": 3, "ui_s/patch median": med,
         "ui_s max": max(secs), "raw core s/patch": raw, "ratio ui/raw": med / raw if raw else float("nan")},
        {"tools": "rectangle (before)", "actions/patch": 5, "ui_s/patch median": "-", "ui_s max": "-",
         "raw core s/patch": "-", "ratio ui/raw": "-"},
        {"tools": "polygon (before)", "actions/patch": "8+", "ui_s/patch median": "-", "ui_s max": "-",
         "raw core s/patch": "-", "ratio ui/raw": "-"},
    ]))
    print(f"\ngoal: <= 3 actions and <= 5 s per patch; {len(rows)} patches corrected")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
