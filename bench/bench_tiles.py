"""Tile-server speed on the bundled sample: latency p50/p99 with 1 and 8 concurrent clients against the running
server extension, next to the in-process bound (read the region + JPEG-encode on one and on two threads, same
tiles, same run; the 2-thread figure is the bound the ratio table uses on a 2-core machine), the JPEG encoders
(PIL, OpenCV, imagecodecs) on the same tiles, and the time from opening the app URL to the first painted tiles
in headless Chromium.

    python bench/bench_tiles.py [--rounds 3] [--no-browser] [--json bench/results/tiles.json]

Cold numbers come from a server with its tile cache off (every request decodes); warm ones from the default
cache after one pass. Nothing here is asserted: it is a measurement to read.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "apps"))  # the app-server and browser helpers of the tests

from _browser import app_server, browser_page  # noqa: E402

from al_core.cli.app_cmds import build_demo  # noqa: E402
from al_core.project.project import Project  # noqa: E402
from al_core.tiles.pyramid import Pyramid  # noqa: E402
from al_core.tiles.render import render_slide_tile  # noqa: E402


def all_tiles(pyr: Pyramid) -> list[tuple[int, int, int]]:
    return [(z, x, y) for z in range(pyr.zmax + 1) for x in range(pyr.grid_size(z)[0])
            for y in range(pyr.grid_size(z)[1])]


def pct(values: list[float], q: float) -> float:
    vals = sorted(values)
    return vals[min(len(vals) - 1, round(q / 100 * (len(vals) - 1)))]


def summary(ms: list[float], wall: float) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p99_ms": round(pct(ms, 99), 2),
            "mean_ms": round(statistics.fmean(ms), 2), "tiles_per_s": round(len(ms) / wall, 1)}


def raw_bound(project: Project, tiles: list[tuple[int, int, int]], rounds: int, threads: int = 1) -> dict[str, float]:
    """read + resize + JPEG encode in this process on ``threads`` threads (one slide handle each), no HTTP, no
    cache: what the machine's cores can do at best."""
    row = project.slides()[0]
    pyr = Pyramid(row.width, row.height)
    ms: list[float] = []
    lock = threading.Lock()
    work = tiles * rounds

    def run(part: list[tuple[int, int, int]]) -> None:
        mine = []
        with project.open_slide(row.id) as slide:
            for z, x, y in part:
                t = time.perf_counter()
                render_slide_tile(slide, pyr, z, x, y)
                mine.append((time.perf_counter() - t) * 1e3)
        with lock:
            ms.extend(mine)

    pool = [threading.Thread(target=run, args=(work[i::threads],)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return summary(ms, time.perf_counter() - t0)


def encoders(project: Project, tiles: list[tuple[int, int, int]]) -> list[dict[str, object]]:
    """JPEG encoders on the same tiles at the server's quality: PIL, OpenCV and imagecodecs (all libjpeg-turbo)."""
    import io

    import cv2
    import imagecodecs
    import numpy as np
    from PIL import Image

    from al_core.tiles.render import JPEG_QUALITY

    row = project.slides()[0]
    pyr = Pyramid(row.width, row.height)
    with project.open_slide(row.id) as slide:
        pixels = [slide.read(pyr.region(z, x, y)[:2], pyr.valid_size(z, x, y), downsample=float(pyr.region(z, x, y)[3]))
                  for z, x, y in tiles[-64:]]

    def pil(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()

    def ocv(a: np.ndarray) -> bytes:
        return bytes(cv2.imencode(".jpg", cv2.cvtColor(a, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1])

    def icd(a: np.ndarray) -> bytes:
        return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(a), level=JPEG_QUALITY))

    rows: list[dict[str, object]] = []
    for name, fn in [("PIL", pil), ("OpenCV", ocv), ("imagecodecs (the server's)", icd)]:
        fn(pixels[0])
        t0 = time.perf_counter()
        size = sum(len(fn(a)) for a in pixels for _ in range(3))
        ms = (time.perf_counter() - t0) / (3 * len(pixels)) * 1e3
        rows.append({"encoder": name, "ms_per_tile": round(ms, 3), "kB_per_tile": round(size / 3 / len(pixels) / 1e3, 1)})
    for r in rows:
        r["vs PIL"] = round(float(rows[0]["ms_per_tile"]) / float(r["ms_per_tile"]), 2)  # type: ignore[arg-type]
    return rows


def ratio_table(results: dict[str, object]) -> None:
    """Each server run against the 2-thread raw bound of the same run (p50 latency and throughput).

    ``queue floor ms`` is what the bound allows a closed loop of that many clients (each waits for its tile
    before asking the next): by Little's law their mean latency is at least clients / bound tiles/s, however
    fast one tile is, when every tile has to be read and encoded (a cold cache)."""
    bound = results["raw_read_encode_2_threads"]
    assert isinstance(bound, dict)
    print("\n| run | p50 ms | p99 ms | tiles/s | p50 / bound p50 | tiles/s / bound tiles/s | queue floor ms |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if isinstance(r, dict) and "p50_ms" in r:
            floor = f"{1e3 * r['clients'] / bound['tiles_per_s']:.1f}" if "clients" in r else ""
            print(f"| {name} | {r['p50_ms']} | {r['p99_ms']} | {r['tiles_per_s']} | "
                  f"{r['p50_ms'] / bound['p50_ms']:.2f} | {r['tiles_per_s'] / bound['tiles_per_s']:.2f} | {floor} |")


def http_run(port: int, token: str, paths: list[str], clients: int) -> dict[str, float]:
    """``clients`` threads, each with one keep-alive connection, splitting ``paths`` between them."""
    ms: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client(part: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for path in part:
            t = time.perf_counter()
            conn.request("GET", path, headers={"Authorization": f"token {token}"})
            resp = conn.getresponse()
            resp.read()
            mine.append((time.perf_counter() - t) * 1e3)
            if resp.status != 200:
                errors.append(f"{resp.status} {path}")
        conn.close()
        with lock:
            ms.extend(mine)

    threads = [threading.Thread(target=client, args=(paths[i::clients],)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return {**summary(ms, wall), "clients": clients}


def polygon_file(path: Path, width: int, height: int, count: int) -> Path:
    """A QuPath-style GeoJSON of ``count`` small squares of class Epithelium spread over the slide."""
    import random

    rng = random.Random(0)
    feats = []
    for _ in range(count):
        x, y, s = rng.uniform(0, width - 20), rng.uniform(0, height - 20), rng.uniform(4, 16)
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"classification": {"name": "Epithelium"}}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def during_import(port: int, token: str, paths: list[str], folder: Path, labels: Path) -> dict[str, object]:
    """8 clients on cold tiles while ``slideloop labels import`` runs (a separate process, as from a shell)."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "al_core.cli", "labels", "import", str(folder), str(labels)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.perf_counter()
    runs = []
    while proc.poll() is None and len(runs) < 20:  # bounded: at most 20 passes over the tiles
        runs.append(http_run(port, token, paths, 8))
    import_s = time.perf_counter() - t0
    proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"label import failed: {proc.stderr.read() if proc.stderr else ''}")
    worst = max(runs, key=lambda r: r["p99_ms"]) if runs else {}
    return {**worst, "passes": len(runs), "import_s": round(import_s, 2)}


#: seconds a fresh server is left alone before a first-paint run, as the warm server's were (its kernel ready)
WARM_WAIT_S = 15


def first_paint(url: str) -> dict[str, float]:
    with browser_page() as (page, _):
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_selector(".slideloop-map img.leaflet-tile-loaded[src*='/slideloop/tiles/']", timeout=120_000)
        first = time.perf_counter() - t0
        page.wait_for_function(
            "() => { const t = document.querySelectorAll(\".slideloop-map img.leaflet-tile[src*='/slideloop/']\");"
            " return t.length > 0 && Array.from(t).every(e => e.classList.contains('leaflet-tile-loaded')); }",
            timeout=120_000)
        return {"first_tile_s": round(first, 2), "all_visible_tiles_s": round(time.perf_counter() - t0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="passes over every tile of the sample pyramid")
    ap.add_argument("--no-browser", action="store_true", help="skip the time-to-first-tiles measurement")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--import-polygons", type=int, default=5000,
                    help="polygons of the label import run beside 8 clients (0: skip; the issue's case had 30k)")
    ap.add_argument("--server-args", nargs="*", default=[], metavar="ARG",
                    help="extra options of the cold server, e.g. --SlideloopTiles.workers=2")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="slideloop-bench-") as tmp:
        work = Path(tmp)
        folder = build_demo(work / "demo").resolve()
        with Project.open(folder) as proj:
            row = proj.slides()[0]
            tiles = all_tiles(Pyramid(row.width, row.height))
            results: dict[str, object] = {"slide": f"{row.name} {row.width}x{row.height}, {row.levels} level(s)",
                                          "tiles_per_round": len(tiles), "rounds": args.rounds,
                                          "raw_read_encode_1_thread": raw_bound(proj, tiles, args.rounds),
                                          "raw_read_encode_2_threads": raw_bound(proj, tiles, args.rounds, 2),
                                          "jpeg_encoders": encoders(proj, tiles)}
        paths = [f"/slideloop/tiles/{row.id}/{z}/{x}/{y}.jpeg" for z, x, y in tiles] * args.rounds
        cold_args = ("--SlideloopTiles.cache_mb=0", *args.server_args)
        with app_server(folder, work / "cold", extra_args=cold_args) as srv:
            port = int(srv.url.split(":")[2].split("/")[0])
            http_run(port, srv.token, paths[:20], 1)  # connection set-up, imports
            results["server_cold_1_client"] = http_run(port, srv.token, paths, 1)
            results["server_cold_8_clients"] = http_run(port, srv.token, paths, 8)
            if args.import_polygons:
                geo = polygon_file(work / "many.geojson", row.width, row.height, args.import_polygons)
                results["server_cold_8_clients_during_import"] = during_import(port, srv.token, paths, folder, geo)
        with app_server(folder, work / "warm") as srv:
            port = int(srv.url.split(":")[2].split("/")[0])
            http_run(port, srv.token, paths[: len(tiles)], 1)  # fill the cache
            results["server_cached_1_client"] = http_run(port, srv.token, paths, 1)
            results["server_cached_8_clients"] = http_run(port, srv.token, paths, 8)
            labels = [p.replace("/tiles/", "/labels/").replace(".jpeg", ".png") for p in paths[: len(tiles)]]
            results["labels_cold_1_client"] = http_run(port, srv.token, labels, 1)
            if not args.no_browser:
                results["app_open_to_tiles"] = first_paint(srv.app_url())
        if not args.no_browser:
            # the same page without the warm kernel (slideloop_apps.kernels): a kernel start and imports per page
            with app_server(folder, work / "no-warm", warm=0) as srv:
                time.sleep(WARM_WAIT_S)
                results["app_open_to_tiles_no_warm_kernel"] = first_paint(srv.app_url())
    print(json.dumps(results, indent=2))
    ratio_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
