"""Label geometry in and out: QuPath GeoJSON, NoCodeSeg/QuPath mask tiles, whole-slide label images.

Geometry is kept as shapely polygons in level-0 pixel coordinates; masks are made from it on demand
(:func:`rasterize`), with later annotations painted over earlier ones.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio.features
import shapely
from affine import Affine
from shapely.geometry import MultiPolygon, Polygon, mapping, shape
from shapely.geometry.base import BaseGeometry

from al_core.errors import LabelError

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


# --- GeoJSON --------------------------------------------------------------------------------------


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


def polygonal_part(geom: BaseGeometry) -> BaseGeometry:
    """The (Multi)Polygon part of a geometry; make_valid can return collections with lines and points."""
    if isinstance(geom, Polygon | MultiPolygon):
        return geom
    polys: list[Polygon] = []
    for g in getattr(geom, "geoms", []):
        part = polygonal_part(g)
        polys.extend(getattr(part, "geoms", [part]) if not part.is_empty else [])
    return MultiPolygon(polys) if polys else Polygon()


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


# --- masks ----------------------------------------------------------------------------------------


def mask_to_shapes(
    mask: npt.NDArray[Any], *, offset: tuple[float, float] = (0.0, 0.0), scale: float = 1.0, background: int = 0
) -> list[tuple[int, BaseGeometry]]:
    """Vectorise a class-index mask into one (Multi)Polygon per class, with exact pixel-edge boundaries.

    ``offset``/``scale`` map mask pixels to level-0 pixels (x0 = offset_x + col * scale).
    """
    if mask.ndim != 2:
        raise ValueError(f"a label mask must be 2-D, got shape {mask.shape}")
    values = mask.astype(np.int32) if mask.dtype not in (np.uint8, np.int16, np.uint16, np.int32) else mask
    transform = Affine(scale, 0, offset[0], 0, scale, offset[1])
    by_class: dict[int, list[BaseGeometry]] = {}
    for geom_json, value in rasterio.features.shapes(values, mask=values != background, transform=transform):
        by_class.setdefault(int(value), []).append(shape(geom_json))
    return [(cls, shapely.union_all(geoms)) for cls, geoms in sorted(by_class.items())]


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


def rasterize(
    shapes: Sequence[tuple[int, BaseGeometry]],
    origin: tuple[float, float],
    downsample: float,
    out_size: tuple[int, int],
    fill: int = 0,
) -> npt.NDArray[np.uint8]:
    """Paint (class index, geometry) pairs, in order, into a ``out_size`` (w, h) mask whose top-left pixel
    is level-0 ``origin`` and whose pixels are ``downsample`` level-0 pixels wide."""
    w, h = out_size
    if not shapes:
        return np.full((h, w), fill, dtype=np.uint8)
    transform = Affine(downsample, 0, origin[0], 0, downsample, origin[1])
    return rasterio.features.rasterize(
        [(g, int(c)) for c, g in shapes if not g.is_empty],
        out_shape=(h, w), transform=transform, fill=fill, dtype=np.uint8,
    )


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    if not re.fullmatch(r"[0-9a-fA-F]{6}", c):
        raise ValueError(f"not a #RRGGBB colour: {color!r}")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def rgb_to_hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb[:3]))
