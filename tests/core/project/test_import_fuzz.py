"""Generated label files thrown at the importers (hypothesis): GeoJSON, mask-tile folders and label images.

Each example is written to a real file and imported into a real project. Whatever it holds, the import either
adds one label version or raises a :class:`~al_core.errors.SlideloopError` naming the file, and a refused
import leaves the slide's labels as they were (no partial write). Inputs are small (a 64x48 px slide) so the
default 1,000 examples per importer run in seconds; ``SLIDELOOP_FUZZ_EXAMPLES`` changes the count.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from al_core.errors import SlideloopError
from al_core.project.project import Project

W, H = 64, 48
EXAMPLES = int(os.environ.get("SLIDELOOP_FUZZ_EXAMPLES", "1000"))
settings.register_profile("importers", max_examples=EXAMPLES, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ = settings.get_profile("importers")
_names = itertools.count()


@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """A project with one small slide (a PNG) and classes Epithelium (1) and Stroma (2)."""
    root = tmp_path_factory.mktemp("fuzz")
    slide = root / "s.png"
    Image.fromarray(np.full((H, W, 3), 200, np.uint8)).save(slide)
    with Project.create(root / "P", ["Epithelium:#ff0000", "Stroma:#00ff00"]) as p:
        p.add_slide(slide, mpp=0.5)
        yield p


def _import(proj: Project, path: Path) -> None:
    """Import ``path``: one new version, or a named error and the labels untouched."""
    slide = proj.slides()[0]
    before = proj.labels.version(slide.id)
    shapes_before = len(proj.labels.annotations(slide.id))
    try:
        res = proj.import_labels(path, slide="s")
    except SlideloopError as err:
        assert path.name in str(err) or path.parent.name in str(err), str(err)
        assert proj.labels.version(slide.id) == before
        assert len(proj.labels.annotations(slide.id)) == shapes_before
        return
    assert res.version == before + 1 and res.shapes >= 0  # an all-background mask is a version of no shapes


# --- GeoJSON -----------------------------------------------------------------------------------------------

NUMBER = st.one_of(st.integers(-100, 200), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([1e309, -1e309, 1e300, 0.5]))
POSITION = st.one_of(st.lists(NUMBER, min_size=2, max_size=2), st.lists(NUMBER, max_size=4),
                     st.just("x"), st.just(None), st.just([[1, 2]]))
RING = st.one_of(st.lists(POSITION, min_size=3, max_size=7).map(lambda r: [*r, r[0]]),
                 st.lists(POSITION, max_size=3), st.just(7))
SQUARE = [[10, 10], [40, 10], [40, 30], [10, 30], [10, 10]]
GEOMETRY = st.one_of(
    st.builds(lambda rings: {"type": "Polygon", "coordinates": rings}, st.lists(RING, min_size=1, max_size=2)),
    st.builds(lambda polys: {"type": "MultiPolygon", "coordinates": polys},
              st.lists(st.lists(RING, min_size=1, max_size=2), min_size=1, max_size=2)),
    st.builds(lambda t, c: {"type": t, "coordinates": c},
              st.sampled_from(["Point", "LineString", "Blob", "GeometryCollection", "Polygon", 3]),
              st.one_of(POSITION, st.lists(POSITION, max_size=3))),
    st.just({"type": "Polygon", "coordinates": [SQUARE]}),
    st.just({"type": "GeometryCollection", "geometries": [{"type": "Polygon", "coordinates": [SQUARE]}]}),
    st.none(), st.integers(), st.text(max_size=5),
)
CLASS = st.one_of(
    st.builds(lambda n: {"name": n}, st.one_of(st.sampled_from(["Epithelium", "stroma", "Tumor", ""]),
                                               st.lists(st.text(max_size=3), max_size=2), st.integers())),
    st.builds(lambda n, c: {"names": n, "color": c}, st.lists(st.sampled_from(["Epithelium", "x"]), max_size=2),
              st.lists(st.one_of(st.integers(-300, 300), st.floats()), max_size=4)),
    st.sampled_from(["Epithelium", "Stroma"]), st.none(), st.integers(),
)
PROPERTIES = st.one_of(
    st.fixed_dictionaries({"classification": CLASS},
                          optional={"objectType": st.sampled_from(["annotation", "detection", "other", 5])}),
    st.none(), st.lists(st.integers(), max_size=2), st.text(max_size=3),
)
GOOD_RING = st.lists(st.tuples(st.integers(-10, 80), st.integers(-10, 60)), min_size=3, max_size=6).map(
    lambda r: [list(v) for v in (*r, r[0])])
GOOD = st.fixed_dictionaries({  # a feature that imports (unless its ring is degenerate or off the slide)
    "type": st.just("Feature"),
    "geometry": st.one_of(st.just({"type": "Polygon", "coordinates": [SQUARE]}),
                          GOOD_RING.map(lambda r: {"type": "Polygon", "coordinates": [r]})),
    "properties": st.fixed_dictionaries({"classification": st.sampled_from(
        [{"name": "Epithelium"}, {"name": "stroma", "color": [0, 255, 0]}, "Stroma"])}),
})
FEATURE = st.one_of(GOOD, GOOD, st.fixed_dictionaries({"type": st.just("Feature"), "geometry": GEOMETRY,
                                                       "properties": PROPERTIES}), st.integers(), st.text(max_size=4))
DOCUMENT = st.one_of(
    st.builds(lambda f: {"type": "FeatureCollection", "features": f}, st.lists(GOOD, min_size=1, max_size=3)),
    st.builds(lambda f: {"type": "FeatureCollection", "features": f}, st.lists(FEATURE, max_size=4)),
    st.lists(FEATURE, max_size=3), FEATURE,
    st.builds(lambda f: {"type": "FeatureCollection", "features": f}, st.one_of(st.none(), st.integers())),
)


def _geojson_text(doc: Any, mode: int, depth: int) -> bytes:
    if mode == 0:
        return json.dumps(doc, allow_nan=True).encode()
    if mode == 1:
        return ("[" * depth + "]" * depth).encode()
    if mode == 2:
        return json.dumps(doc, allow_nan=True).encode()[: depth % 200]  # truncated
    return bytes([depth % 256]) * 3 + b"\xff\xfe"  # not text at all


@FUZZ
@given(doc=DOCUMENT, mode=st.sampled_from([0, 0, 0, 0, 1, 2, 3]), depth=st.integers(1, 200_000))
def test_generated_geojson(proj: Project, doc: Any, mode: int, depth: int) -> None:
    path = proj.root.parent / f"g{next(_names)}.geojson"
    path.write_bytes(_geojson_text(doc, mode, depth))
    _import(proj, path)


# --- mask tiles -------------------------------------------------------------------------------------------

FIELD = st.one_of(st.integers(-70, 70).map(str), st.sampled_from(["0", "1.2.3", "9" * 30, "-0", "64", ".5", ""]))


def _mask_bytes(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "tif":
        tifffile.imwrite(buf, arr)
    elif fmt == "png":
        Image.fromarray(arr).save(buf, format="PNG")
    else:
        return arr.tobytes()[:50]  # garbage under an image suffix
    return buf.getvalue()


MASK = st.builds(lambda h, w, seed, top, rgb: _mask(h, w, seed, top, rgb),
                 st.integers(1, 24), st.integers(1, 24), st.integers(0, 2**31), st.integers(0, 4), st.booleans())


def _mask(h: int, w: int, seed: int, top: int, rgb: bool) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, top + 1, size=(h, w), dtype=np.uint8)
    return np.repeat(arr[..., None], 3, axis=2) if rgb else arr


@FUZZ
@given(tiles=st.lists(st.tuples(st.sampled_from(["1", "1", "2", "0.5", "0", "1.2.3", "1e3"]), FIELD, FIELD, FIELD,
                                FIELD, MASK, st.sampled_from(["png", "png", "tif", "junk"]), st.booleans()),
                      min_size=1, max_size=3))
def test_generated_mask_tiles(proj: Project, tiles: list[tuple[Any, ...]]) -> None:
    folder = proj.root.parent / f"t{next(_names)}"
    (folder / "Labels").mkdir(parents=True)
    for i, (d, x, y, w, h, arr, fmt, fits) in enumerate(tiles):
        if fits:  # a name that matches its mask: the tile imports unless something else is wrong
            d, x, y, w, h = "1", str(abs(int(x)) % W if x.lstrip("-").isdigit() and len(x) < 5 else 0), "0", \
                str(arr.shape[1]), str(arr.shape[0])
        suffix = ".tif" if fmt == "tif" else ".png"
        name = f"s{i} [d={d},x={x},y={y},w={w},h={h}]{suffix}"
        (folder / "Labels" / name).write_bytes(_mask_bytes(arr, fmt))
    _import(proj, folder)


# --- label images -----------------------------------------------------------------------------------------


@FUZZ
@given(h=st.sampled_from([H, H, 1, 47, 49, 300]), w=st.sampled_from([W, W, 1, 63, 65, 400]),
       seed=st.integers(0, 2**31), top=st.one_of(st.integers(0, 2), st.integers(0, 300)), fmt=st.sampled_from(["png", "png", "tif", "tif", "junk"]),
       rgb=st.booleans(), shapes=st.integers(0, 3))
def test_generated_label_images(proj: Project, h: int, w: int, seed: int, top: int, fmt: str, rgb: bool,
                                shapes: int) -> None:
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if top > 255 and fmt == "tif" else np.uint8
    arr = np.zeros((h, w), dtype)
    for _ in range(shapes):  # a few blocks of one class each (random pixels would make thousands of shapes)
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        arr[y0:y0 + 1 + int(rng.integers(0, 20)), x0:x0 + 1 + int(rng.integers(0, 20))] = min(top, int(
            rng.integers(0, top + 1)), np.iinfo(dtype).max)
    if rgb:
        arr = np.repeat(arr[..., None], 3, axis=2)
        if shapes and rng.random() < 0.5:
            arr[0, 0, 1] ^= 1  # a colour pixel
    path = proj.root.parent / f"s.{next(_names)}.labels.{'tif' if fmt == 'tif' else 'png'}"
    if fmt == "png" and dtype == np.uint16:
        fmt = "tif"
    path.write_bytes(_mask_bytes(arr if fmt != "png" or arr.dtype == np.uint8 else arr.astype(np.uint8), fmt))
    _import(proj, path)


def test_the_profile_runs_a_thousand_examples_per_importer() -> None:
    """CI keeps the count the issue asks for (a lower one is only for local runs)."""
    assert EXAMPLES >= 1000 or os.environ.get("SLIDELOOP_FUZZ_EXAMPLES"), EXAMPLES
    assert FUZZ.deadline is None and math.isfinite(FUZZ.max_examples)
