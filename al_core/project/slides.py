"""Registering slide files in a project: the metadata and tissue mask stored for each, and reopening them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from al_core.errors import ProjectError
from al_core.project.schema import SlideRow
from al_core.wsi.slides import Slide, open_slide
from al_core.wsi.tissue import TissueMask, compute_tissue


def slide_name_for(path: Path) -> str:
    """A slide's default name: the file name without its (double) suffix (``x.ome.tif`` → ``x``)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def describe_slide(path: Path, name: str, mpp: float | None = None) -> SlideRow:
    """A new (unsaved) slide row for ``path``: its metadata and tissue mask, read from the file."""
    with open_slide(path, mpp=mpp) as slide:
        tissue = compute_tissue(slide)
        return SlideRow(
            name=name, path=str(path), mpp=slide.mpp, mpp_from_user=mpp is not None,
            width=slide.dimensions[0], height=slide.dimensions[1], levels=slide.level_count,
            objective_power=slide.objective_power, vendor=slide.vendor,
            tissue_png=_png_bytes(tissue.mask), tissue_downsample=tissue.downsample, tissue_fraction=tissue.fraction,
        )


def open_registered(row: SlideRow) -> Slide:
    """Open a registered slide with the scale stored for it."""
    slide = open_slide(row.path, mpp=row.mpp if row.mpp_from_user else None)
    if slide.mpp is None and row.mpp is not None:
        slide.mpp = row.mpp
    return slide


def stored_tissue(row: SlideRow) -> TissueMask:
    """The tissue mask computed when the slide was added."""
    if row.tissue_png is None or row.tissue_downsample is None:
        raise ProjectError(f"slide {row.name!r} has no tissue mask")
    mask = np.asarray(Image.open(io.BytesIO(row.tissue_png))) > 0
    return TissueMask(mask, row.tissue_downsample)


def _png_bytes(mask: npt.NDArray[np.bool_]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
