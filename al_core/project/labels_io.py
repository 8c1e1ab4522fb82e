"""Label files in and out: QuPath GeoJSON, NoCodeSeg/QuPath mask tiles, whole-slide label images.

Geometry is kept as shapely polygons in level-0 pixel coordinates.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import mapping, shape
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
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise LabelError(p, "file not found") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LabelError(p, f"not valid JSON ({err})") from err
    features = _features(p, data)
    report = ImportReport()
    repaired = skipped = empty = 0
    for i, feat in enumerate(features):
        geom_json = feat.get("geometry") if isinstance(feat, dict) else None
        if not geom_json:
            skipped += 1
            continue
        try:
            geom = shape(geom_json)
        except (ValueError, TypeError, AttributeError, shapely.errors.GEOSException) as err:
            raise LabelError(p, f"feature {i}: invalid geometry ({err})") from err
        props = feat.get("properties") or {}
        if props.get("objectType") not in (None, "annotation", "detection", "cell", "tile"):
            skipped += 1
            continue
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
            repaired += 1
        geom = polygonal_part(geom)
        if geom.is_empty or geom.area <= 0:
            empty += 1
            continue
        name, color = _classification(props)
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
        if name is None and isinstance(cls.get("names"), list) and cls["names"]:
            name = ":".join(str(n) for n in cls["names"])  # QuPath derived classes "A: B"
        c = cls.get("color") or cls.get("colorRGB")
        if isinstance(c, list) and len(c) >= 3:
            color = (int(c[0]), int(c[1]), int(c[2]))
    elif isinstance(cls, str):
        name = cls
    if name is None and isinstance(props.get("classification_name"), str):
        name = props["classification_name"]
    return name, color


def to_geojson(shapes: Iterable[tuple[BaseGeometry, str, str]]) -> dict[str, Any]:
    """QuPath-style FeatureCollection from (geometry, class name, '#rrggbb') triples."""
    features = []
    for geom, name, color in shapes:
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": mapping(geom),
            "properties": {
                "objectType": "annotation",
                "classification": {"name": name, "color": list(hex_to_rgb(color))},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def read_mask_image(path: Path) -> npt.NDArray[Any]:
    """A class-index mask from PNG/TIFF; RGB(A) masks must be grey (all channels equal)."""
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
        tiles.append(MaskTile(f, f.name[: m.start()].strip(), float(m["d"] or 1), int(m["x"]), int(m["y"]),
                              int(m["w"]), int(m["h"])))
    if not tiles:
        raise LabelError(folder, "no mask tiles (*.png/*.tif) found")
    return tiles


def read_mask_tiles(folder: str | Path) -> ImportReport:
    """Import a NoCodeSeg/QuPath tile export (``Images/`` + ``Labels/``) as polygons per class index."""
    folder = Path(folder)
    tiles = find_mask_tiles(folder)
    report = ImportReport(slide_hint=tiles[0].slide_name or None)
    by_class: dict[int, list[BaseGeometry]] = {}
    for t in tiles:
        mask = read_mask_image(t.path)
        want = (round(t.h / t.downsample), round(t.w / t.downsample))
        if abs(mask.shape[0] - want[0]) > 1 or abs(mask.shape[1] - want[1]) > 1:
            raise LabelError(t.path, f"mask is {mask.shape[1]}x{mask.shape[0]} px but its name says "
                                     f"{t.w}x{t.h} at d={t.downsample:g}, i.e. {want[1]}x{want[0]}")
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
    mask = read_mask_image(p)
    if (mask.shape[1], mask.shape[0]) != tuple(slide_size):
        raise LabelError(p, f"label image is {mask.shape[1]}x{mask.shape[0]} px, the slide is "
                            f"{slide_size[0]}x{slide_size[1]}")
    return ImportReport([Shape(None, g, class_idx=c) for c, g in mask_to_shapes(mask)])
