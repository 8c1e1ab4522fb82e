"""Label files in and out: QuPath GeoJSON, NoCodeSeg/QuPath mask tiles, whole-slide label images.

Geometry is kept as shapely polygons in level-0 pixel coordinates.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from al_core.errors import LabelError
from al_core.project.classes import hex_to_rgb
from al_core.wsi.raster import mask_to_shapes, polygonal_part

#: QuPath's TileExporter names tiles "<image> [d=4,x=8192,y=4096,w=2048,h=2048].png" (optionally with a
#: suffix such as "-labelled"); the bracket gives the level-0 region and the downsample of the tile
TILE_NAME = re.compile(
    r"\[(?:d=(?P<d>[\d.]+),\s*)?x=(?P<x>-?\d+),\s*y=(?P<y>-?\d+),\s*w=(?P<w>\d+),\s*h=(?P<h>\d+)\]"
)


_MASK_SUFFIXES = (".png", ".tif", ".tiff")
#: the largest GeoJSON file read (QuPath exports of whole-slide cell detections reach a few hundred MB)
MAX_GEOJSON_BYTES = 2 << 30
#: level-0 coordinates beyond this are no slide's (the largest scans are ~200k px a side)
MAX_COORDINATE = 1e7
#: the largest mask or label image decoded, in pixels (a 200k x 200k slide-sized label image would be 40 G)
MAX_MASK_PIXELS = 4 << 30
#: nesting depth of each geometry type's coordinates (0: a position)
_DEPTHS = {"Point": 0, "MultiPoint": 1, "LineString": 1, "MultiLineString": 2, "Polygon": 2, "MultiPolygon": 3}


@dataclass
class Shape:
    """One imported region: a class name (or index) and its polygon(s) in level-0 pixels."""

    class_name: str | None
    geometry: BaseGeometry
    class_idx: int | None = None
    color: tuple[int, int, int] | None = None


@dataclass
class ImportReport:
    """What an import did besides adding shapes: repairs and drops, said to the user."""

    shapes: list[Shape] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    slide_hint: str | None = None


def read_geojson(path: str | Path) -> ImportReport:
    """Read QuPath-exported GeoJSON (FeatureCollection, a list of Features, or one Feature).

    Polygons and MultiPolygons are kept (other geometry types are skipped and reported); invalid ones are
    repaired with ``shapely.make_valid``; empty ones dropped. Every feature needs a classification name.
    """
    p = Path(path)
    try:
        if p.stat().st_size > MAX_GEOJSON_BYTES:
            raise LabelError(p, f"is {p.stat().st_size:,} bytes; the limit for a GeoJSON file is {MAX_GEOJSON_BYTES:,}")
        data = json.loads(p.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError as err:
        raise LabelError(p, "file not found") from err
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise LabelError(p, f"not valid JSON ({err})") from err
    except RecursionError:
        raise LabelError(p, "JSON nested too deeply to be GeoJSON") from None
    features = _features(p, data)
    report = ImportReport()
    repaired = skipped = empty = 0
    for i, feat in enumerate(features):
        geom_json = feat.get("geometry") if isinstance(feat, dict) else None
        if not geom_json:
            skipped += 1
            continue
        _check_geometry(p, i, geom_json)
        try:
            geom = shape(geom_json)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, shapely.errors.GEOSException) as err:
            raise LabelError(p, f"feature {i}: invalid geometry ({err})") from err
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise LabelError(p, f"feature {i}: 'properties' is a {type(props).__name__}, not an object")
        if props.get("objectType") not in (None, "annotation", "detection", "cell", "tile"):
            skipped += 1
            continue
        try:
            if not geom.is_valid:
                geom = shapely.make_valid(geom)
                repaired += 1
            geom = polygonal_part(geom)
        except shapely.errors.GEOSException as err:
            raise LabelError(p, f"feature {i}: geometry cannot be repaired ({err})") from err
        if geom.is_empty or geom.area <= 0:
            empty += 1
            continue
        try:
            name, color = _classification(props)
        except ValueError as err:
            raise LabelError(p, f"feature {i}: {err}") from None
        if name is None:
            raise LabelError(p, f"feature {i} has no classification name (QuPath: set a class before exporting)")
        report.shapes.append(Shape(name, geom, color=color))
    if not report.shapes:
        raise LabelError(p, "contains no polygon geometry to import")
    if repaired:
        report.notes.append(f"repaired {repaired} invalid (self-intersecting) polygon(s) with make_valid")
    if empty:
        report.notes.append(f"dropped {empty} empty or zero-area polygon(s)")
    if skipped:
        report.notes.append(f"skipped {skipped} feature(s) without polygon geometry")
    return report


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _check_geometry(p: Path, i: int, geom: Any) -> None:
    """A GeoJSON geometry's shape before shapely sees it: known type, coordinates nested as the type says,
    every number finite (``1e309`` parses as infinity) and within :data:`MAX_COORDINATE`."""
    if not isinstance(geom, dict):
        raise LabelError(p, f"feature {i}: geometry is a {type(geom).__name__}, not an object")
    kind = geom.get("type")
    if kind == "GeometryCollection":
        parts = geom.get("geometries")
        if not isinstance(parts, list):
            raise LabelError(p, f"feature {i}: GeometryCollection without a 'geometries' list")
        for part in parts:
            if isinstance(part, dict) and part.get("type") == "GeometryCollection":
                raise LabelError(p, f"feature {i}: nested GeometryCollections are not supported")
            _check_geometry(p, i, part)
        return
    depth = _DEPTHS.get(kind) if isinstance(kind, str) else None
    if depth is None:
        raise LabelError(p, f"feature {i}: unknown geometry type {kind!r}")
    _check_coords(p, i, geom.get("coordinates"), depth)


def _check_coords(p: Path, i: int, coords: Any, depth: int) -> None:
    if not isinstance(coords, list):
        raise LabelError(p, f"feature {i}: coordinates must be nested lists")
    if depth == 0:
        if not 2 <= len(coords) <= 3 or not all(type(v) in (int, float) for v in coords):
            raise LabelError(p, f"feature {i}: a position must be 2 or 3 numbers, got {str(coords)[:60]}")
        if not all(math.isfinite(v) and abs(v) <= MAX_COORDINATE for v in coords):
            raise LabelError(p, f"feature {i}: coordinate {str(coords)[:60]} is not a finite number within "
                                f"±{MAX_COORDINATE:.0e} px")
        return
    for c in coords:
        _check_coords(p, i, c, depth - 1)


def _features(p: Path, data: Any) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if data.get("type") == "FeatureCollection":
            feats = data.get("features")
            if not isinstance(feats, list):
                raise LabelError(p, "FeatureCollection has no 'features' list")
            return feats
        if data.get("type") == "Feature":
            return [data]
        if data.get("type") in ("Polygon", "MultiPolygon"):
            raise LabelError(p, "is a bare geometry without a class; export annotations as Features from QuPath")
    raise LabelError(p, "is not GeoJSON (expected a FeatureCollection or a list of Features)")


def _classification(props: dict[str, Any]) -> tuple[str | None, tuple[int, int, int] | None]:
    cls = props.get("classification")
    name: str | None = None
    color: tuple[int, int, int] | None = None
    if isinstance(cls, dict):
        name = cls.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"classification name {str(name)[:60]} is a {type(name).__name__}, not text")
        if name is None and isinstance(cls.get("names"), list) and cls["names"]:
            name = ":".join(str(n) for n in cls["names"])  # QuPath derived classes "A: B"
        c = cls.get("color") or cls.get("colorRGB")
        if isinstance(c, list) and len(c) >= 3 and all(type(v) is int and 0 <= v <= 255 for v in c[:3]):
            color = (int(c[0]), int(c[1]), int(c[2]))
    elif isinstance(cls, str):
        name = cls
    if name is None and isinstance(props.get("classification_name"), str):
        name = props["classification_name"]
    return name, color


def geojson_bytes(shapes: Iterable[tuple[BaseGeometry, str, str]]) -> bytes:
    """QuPath-style FeatureCollection from (geometry, class name, '#rrggbb') triples, as UTF-8 JSON.

    Geometries are written by GEOS's GeoJSON writer in one vectorised call: walking a whole-slide map's
    vertices through ``shapely.geometry.mapping`` held the GIL for most of the export."""
    items = list(shapes)
    geoms: list[str] = np.asarray(shapely.to_geojson(np.array([g for g, _, _ in items], dtype=object))).tolist()
    features = []
    for (_, name, color), geom_json in zip(items, geoms, strict=True):
        head = json.dumps({"type": "Feature", "id": str(uuid.uuid4()),
                           "properties": {"objectType": "annotation",
                                          "classification": {"name": name, "color": list(hex_to_rgb(color))}}})
        features.append(f'{head[:-1]}, "geometry": {geom_json}}}')
    return ('{"type": "FeatureCollection", "features": [' + ", ".join(features) + "]}").encode()


def mask_size(path: Path) -> tuple[int, int]:
    """A mask image's ``(width, height)`` from its header, without decoding the pixels; refuses images above
    :data:`MAX_MASK_PIXELS`."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
            if len(shape) not in (2, 3):
                raise LabelError(path, f"unexpected mask shape {shape}")
            w, h = int(shape[1]), int(shape[0])
        else:
            from PIL import Image

            with Image.open(path) as im:
                w, h = im.size
    except LabelError:
        raise
    except Exception as err:  # any decoder error: the file is at fault
        raise LabelError(path, f"not a readable mask image ({err})") from err
    if w * h > MAX_MASK_PIXELS or w <= 0 or h <= 0:
        raise LabelError(path, f"is {w}x{h} px; the limit for a mask is {MAX_MASK_PIXELS:,} pixels")
    return w, h


def read_mask_image(path: Path) -> npt.NDArray[Any]:
    """A class-index mask from PNG/TIFF; RGB(A) masks must be grey (all channels equal)."""
    mask_size(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except Exception as err:  # any decoder error: the file is at fault
        raise LabelError(path, f"not a readable mask image ({err})") from err
    if arr.ndim == 3:
        if not (arr[..., :3] == arr[..., :1]).all():
            raise LabelError(path, "is a colour image; a label mask holds one class index per pixel")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise LabelError(path, f"unexpected mask shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class MaskTile:
    """A mask tile file and the region its name gives: ``x``, ``y``, ``w``, ``h`` in level-0 pixels, read at
    ``downsample``."""

    path: Path
    slide_name: str
    downsample: float
    x: int
    y: int
    w: int
    h: int


def find_mask_tiles(folder: Path) -> list[MaskTile]:
    """Mask tiles in ``folder`` (or its ``Labels/`` subfolder), named the way QuPath's TileExporter does."""
    labels = folder / "Labels" if (folder / "Labels").is_dir() else folder
    tiles = []
    for f in sorted(labels.iterdir()):
        if f.suffix.lower() not in _MASK_SUFFIXES:
            continue
        m = TILE_NAME.search(f.name)
        if not m:
            raise LabelError(f, "mask tile name does not carry its region, e.g. 'slide [d=4,x=0,y=0,w=2048,h=2048].png'")
        tiles.append(_tile(f, m))
    if not tiles:
        raise LabelError(folder, "no mask tiles (*.png/*.tif) found")
    return tiles


def _tile(f: Path, m: re.Match[str]) -> MaskTile:
    """The region a tile name gives, checked: a positive finite downsample, sizes and offsets a slide can have."""
    try:
        d = float(m["d"] or 1)
        nums = [int(m[k]) if len(m[k]) <= 12 else MAX_COORDINATE * 10 for k in ("x", "y", "w", "h")]
    except ValueError:
        raise LabelError(f, f"mask tile name {m.group(0)!r} does not hold numbers") from None
    if not (math.isfinite(d) and 1 / 1024 <= d <= 1024):
        raise LabelError(f, f"mask tile downsample d={m['d']} is outside 1/1024 to 1024")
    x, y, w, h = nums
    if not (0 < w <= MAX_COORDINATE and 0 < h <= MAX_COORDINATE and abs(x) <= MAX_COORDINATE
            and abs(y) <= MAX_COORDINATE):
        raise LabelError(f, f"mask tile region {m.group(0)!r} is not a region of a slide (sizes 1 to "
                            f"{MAX_COORDINATE:.0e} px)")
    return MaskTile(f, f.name[: m.start()].strip(), d, int(x), int(y), int(w), int(h))


def read_mask_tiles(folder: str | Path) -> ImportReport:
    """Import a NoCodeSeg/QuPath tile export (``Images/`` + ``Labels/``) as polygons per class index."""
    folder = Path(folder)
    tiles = find_mask_tiles(folder)
    report = ImportReport(slide_hint=tiles[0].slide_name or None)
    by_class: dict[int, list[BaseGeometry]] = {}
    for t in tiles:
        want = (round(t.h / t.downsample), round(t.w / t.downsample))
        w, h = mask_size(t.path)  # from the header: a wrong size is refused before decoding
        if abs(h - want[0]) > 1 or abs(w - want[1]) > 1:
            raise LabelError(t.path, f"mask is {w}x{h} px but its name says "
                                     f"{t.w}x{t.h} at d={t.downsample:g}, i.e. {want[1]}x{want[0]}")
        mask = read_mask_image(t.path)
        scale = t.w / mask.shape[1]
        for cls, geom in mask_to_shapes(mask, offset=(t.x, t.y), scale=scale):
            by_class.setdefault(cls, []).append(geom)
    for cls, geoms in sorted(by_class.items()):
        report.shapes.append(Shape(None, shapely.union_all(geoms), class_idx=cls))
    report.notes.append(f"read {len(tiles)} mask tile(s)")
    return report


def read_label_image(path: str | Path, slide_size: tuple[int, int]) -> ImportReport:
    """Import a label image of the slide's level-0 size (pixel value = class index)."""
    p = Path(path)
    w, h = mask_size(p)  # from the header: a 20000² TIFF of the wrong size is never decoded
    if (w, h) != tuple(slide_size):
        raise LabelError(p, f"label image is {w}x{h} px, the slide is {slide_size[0]}x{slide_size[1]}")
    mask = read_mask_image(p)
    return ImportReport([Shape(None, g, class_idx=c) for c, g in mask_to_shapes(mask)])
