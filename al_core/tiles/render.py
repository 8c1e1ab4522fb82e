"""Rendering tiles to image bytes: slide JPEGs and RGBA PNG overlays of labels, predictions and class maps."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import imagecodecs
import numpy as np
import numpy.typing as npt
from PIL import Image
from shapely.geometry.base import BaseGeometry

from al_core.project.classes import ClassInfo, hex_to_rgb
from al_core.tiles.pyramid import TILE, Pyramid
from al_core.wsi.raster import rasterize
from al_core.wsi.slides import Slide

#: JPEG quality of slide tiles: 85 is visually lossless on H&E at half the bytes of 95
JPEG_QUALITY = 85


#: padding of edge tiles beyond the slide: Leaflet's own map background, so the slide's edge is its true edge
PAD_RGB = (221, 221, 221)


#: opacity of class colours inside an overlay tile (the map layer's own opacity slider multiplies it)
OVERLAY_ALPHA = 255


def render_slide_tile(slide: Slide, pyramid: Pyramid, z: int, x: int, y: int, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of slide tile (z, x, y), read from the best level; edge tiles padded with :data:`PAD_RGB`."""
    pyramid.check(z, x, y)
    x0, y0, _, ds = pyramid.region(z, x, y)
    w, h = pyramid.valid_size(z, x, y)
    pixels = slide.read((x0, y0), (w, h), downsample=float(ds))
    if (w, h) != (pyramid.tile, pyramid.tile):
        canvas = np.empty((pyramid.tile, pyramid.tile, 3), dtype=np.uint8)
        canvas[:] = PAD_RGB
        canvas[:h, :w] = pixels
        pixels = canvas
    return encode_jpeg(pixels, quality)


def class_palette(classes: Sequence[ClassInfo]) -> npt.NDArray[np.uint8]:
    """A 256 x 4 RGBA lookup table: class index → its colour, background (0) and unknown indices transparent."""
    lut = np.zeros((256, 4), dtype=np.uint8)
    for c in classes:
        if c.idx > 0:
            lut[c.idx, :3] = hex_to_rgb(c.color)
            lut[c.idx, 3] = OVERLAY_ALPHA
    return lut


def render_label_tile(shapes: Sequence[tuple[int, BaseGeometry]], palette: npt.NDArray[np.uint8], pyramid: Pyramid,
                      z: int, x: int, y: int) -> bytes:
    """RGBA PNG of label geometry (class index, level-0 polygon) over tile (z, x, y); transparent background."""
    pyramid.check(z, x, y)
    if not shapes:
        return empty_png(pyramid.tile)
    x0, y0, _, ds = pyramid.region(z, x, y)
    mask = rasterize(list(shapes), (x0, y0), float(ds), (pyramid.tile, pyramid.tile))
    return encode_png(palette[mask])


#: alpha inside predicted regions; their outlines are opaque, so a prediction reads apart from the filled labels
PREDICTION_FILL_ALPHA = 80


def render_class_tile(mask: npt.NDArray[np.uint8], palette: npt.NDArray[np.uint8]) -> bytes:
    """RGBA PNG of a class-index tile (e.g. an argmax prediction): class outlines opaque, insides faint."""
    if not mask.any():
        return empty_png(mask.shape[1])
    rgba = palette[mask]
    edge = class_edges(mask)
    rgba[..., 3] = np.where(mask > 0, np.where(edge, rgba[..., 3], np.minimum(rgba[..., 3], PREDICTION_FILL_ALPHA)), 0)
    return encode_png(rgba)


def class_edges(mask: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Outline pixels of a class map: a neighbour within 1 px has another class (2-px lines at screen scale)."""
    edge = np.zeros(mask.shape, dtype=bool)
    for axis in (0, 1):
        step = np.diff(mask, axis=axis) != 0
        pad = [(0, 0), (0, 0)]
        pad[axis] = (1, 0)
        edge |= np.pad(step, pad)
        pad[axis] = (0, 1)
        edge |= np.pad(step, pad)
    return edge


def paste_patch_classes(tile: npt.NDArray[np.uint8], classes: npt.NDArray[np.uint8], patch_origin: tuple[int, int],
                        patch_size: int, tile_origin: tuple[int, int], tile_ds: int) -> None:
    """Resample a patch's class map (covering ``patch_size`` level-0 px at ``patch_origin``) into ``tile``
    (whose pixels are ``tile_ds`` level-0 px from ``tile_origin``), nearest neighbour, in place."""
    th, tw = tile.shape
    # level-0 centre of each tile pixel, then the patch pixel that covers it
    cx = tile_origin[0] + (np.arange(tw) + 0.5) * tile_ds
    cy = tile_origin[1] + (np.arange(th) + 0.5) * tile_ds
    ph, pw = classes.shape
    col = np.floor((cx - patch_origin[0]) * pw / patch_size).astype(np.int64)
    row = np.floor((cy - patch_origin[1]) * ph / patch_size).astype(np.int64)
    cols = np.flatnonzero((col >= 0) & (col < pw))
    rows = np.flatnonzero((row >= 0) & (row < ph))
    if cols.size and rows.size:
        tile[np.ix_(rows, cols)] = classes[np.ix_(row[rows], col[cols])]


def encode_jpeg(rgb: npt.NDArray[np.uint8], quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB tile."""
    # libjpeg-turbo through imagecodecs (tiffslide's codec library): the same bytes as PIL's encoder, which
    # wraps the same library, in ~60 % of the time (bench/bench_tiles.py measures both, and OpenCV)
    return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb), level=quality))


def encode_png(rgba: npt.NDArray[np.uint8]) -> bytes:
    """PNG bytes of an RGBA tile, fast-compressed."""
    # compress_level 1: level 6 costs ~3x the time for ~10 % fewer bytes on flat class colours
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


_EMPTY: dict[int, bytes] = {}


def empty_png(size: int = TILE) -> bytes:
    """A fully transparent tile (the same bytes every time, so browsers and the cache share it)."""
    if size not in _EMPTY:
        _EMPTY[size] = encode_png(np.zeros((size, size, 4), dtype=np.uint8))
    return _EMPTY[size]


#: alpha inside regions of an inference overlay; outlines stay opaque (the layer's opacity slider multiplies both)
CLASS_MAP_FILL_ALPHA = 110


def render_overlay_tile(mask: npt.NDArray[np.uint8], lut: npt.NDArray[np.uint8],
                        fill_alpha: int = CLASS_MAP_FILL_ALPHA) -> bytes:
    """RGBA PNG of a class-index tile through a 256 x 4 ``lut``: classes with alpha 0 in the table (background)
    are transparent, the others have opaque outlines and ``fill_alpha`` insides."""
    visible = lut[mask, 3] > 0
    if not visible.any():
        return empty_png(mask.shape[1])
    rgba = lut[mask]
    edge = class_edges(mask)
    rgba[..., 3] = np.where(visible, np.where(edge, rgba[..., 3], np.minimum(rgba[..., 3], fill_alpha)), 0)
    return encode_png(rgba)


def class_map_lut(classes: Sequence[dict[str, Any]], background: int | None = None) -> npt.NDArray[np.uint8]:
    """256 x 4 RGBA table from ``[{"index", "name", "color"}, ...]`` (a class map's metadata): each class its
    colour, the background class (named 'background', else ``background``, else the lowest index) transparent."""
    lut = np.zeros((256, 4), dtype=np.uint8)
    if not classes:
        return lut
    if background is None:
        named = [int(c["index"]) for c in classes if str(c.get("name", "")).lower() == "background"]
        background = named[0] if named else min(int(c["index"]) for c in classes)
    for c in classes:
        i = int(c["index"])
        if i != background and 0 <= i < 256:
            lut[i, :3] = hex_to_rgb(str(c.get("color") or "#808080"))
            lut[i, 3] = OVERLAY_ALPHA
    return lut


def default_lut() -> npt.NDArray[np.uint8]:
    """The overlay table of a class map without class metadata: 0 transparent, other indices fixed colours."""
    # a class map without slideloop metadata: index 0 is background, others get fixed distinct colours
    colours = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    return class_map_lut([{"index": i, "color": colours[(i - 1) % len(colours)]} for i in range(256)], background=0)


# --- legible review overlays (labels outlined, errors) ---------------------------------------------------

#: alpha inside labelled regions: light enough that nuclei stay visible under the class colour
LABEL_FILL_ALPHA = 45
#: false positives (predicted, not labelled so) and false negatives (labelled, not predicted): Okabe–Ito
#: orange and sky blue, apart for every common colour-vision deficiency and from H&E's pink and purple
ERROR_RGBA = {"fp": (230, 159, 0, 200), "fn": (86, 180, 233, 200)}


def render_outlined_tile(mask: npt.NDArray[np.uint8], palette: npt.NDArray[np.uint8],
                         fill_alpha: int = LABEL_FILL_ALPHA) -> bytes:
    """RGBA PNG of a class-index tile as class-coloured outlines (2 px, opaque) over a light fill."""
    return render_overlay_tile(mask, palette, fill_alpha)


def render_outlined_label_tile(shapes: Sequence[tuple[int, BaseGeometry]], palette: npt.NDArray[np.uint8],
                               pyramid: Pyramid, z: int, x: int, y: int,
                               fill_alpha: int = LABEL_FILL_ALPHA) -> bytes:
    """Like :func:`render_label_tile`, drawn as :func:`render_outlined_tile` (outline + light fill)."""
    pyramid.check(z, x, y)
    if not shapes:
        return empty_png(pyramid.tile)
    x0, y0, _, ds = pyramid.region(z, x, y)
    return render_outlined_tile(rasterize(list(shapes), (x0, y0), float(ds), (pyramid.tile, pyramid.tile)), palette,
                                fill_alpha)


def error_classes(pred: npt.NDArray[np.uint8], label: npt.NDArray[np.uint8],
                  covered: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    """Per pixel 1 = false positive (a class predicted that the label does not have there), 2 = false
    negative (labelled, predicted background), 0 = agreement or no prediction (``covered`` False)."""
    out = np.zeros(pred.shape, dtype=np.uint8)
    out[covered & (pred > 0) & (pred != label)] = 1
    out[covered & (pred == 0) & (label > 0)] = 2
    return out


def render_error_tile(errors: npt.NDArray[np.uint8]) -> bytes:
    """RGBA PNG of :func:`error_classes` in the :data:`ERROR_RGBA` colours; agreement is transparent."""
    if not errors.any():
        return empty_png(errors.shape[1])
    lut = np.zeros((256, 4), dtype=np.uint8)
    lut[1], lut[2] = ERROR_RGBA["fp"], ERROR_RGBA["fn"]
    return encode_png(lut[errors])
