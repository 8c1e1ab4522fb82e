"""Importing a label file into a project: which reader, which slide, which classes, clipped to the slide."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shapely.geometry import box

from al_core.errors import LabelError
from al_core.project.classes import ClassInfo
from al_core.project.labels import Shape
from al_core.project.labels_io import ImportReport, read_geojson, read_label_image, read_mask_tiles
from al_core.project.schema import SlideRow


@dataclass(frozen=True)
class LabelFile:
    """A label file read for one slide of the project: its shapes in project class indices, and what was done."""

    slide: SlideRow
    shapes: list[Shape]
    notes: tuple[str, ...]


def read_label_file(path: Path, slides: Sequence[SlideRow], classes: Sequence[ClassInfo],
                    slide: SlideRow | None = None) -> LabelFile:
    """Read a QuPath GeoJSON file, a mask-tile folder or a slide-sized label image for ``slide`` (default:
    the slide the file names)."""
    if not path.exists():
        raise LabelError(path, "file not found")
    if path.is_dir():
        report = read_mask_tiles(path)
    elif path.suffix.lower() in (".geojson", ".json"):
        report = read_geojson(path)
    else:
        target = slide or slide_for_file(path, None, slides)
        report = read_label_image(path, (target.width, target.height))
    row = slide or slide_for_file(path, report.slide_hint, slides)
    shapes, notes = _clip_to_slide(path, resolve_classes(path, report, classes), row)
    return LabelFile(row, shapes, tuple(report.notes) + notes)


def slide_for_file(p: Path, hint: str | None, slides: Sequence[SlideRow]) -> SlideRow:
    """The slide a label file belongs to: named in it, by its file name, or the project's only slide."""
    stem = p.name.split(".")[0]
    for cand in (hint, stem):
        match = [s for s in slides if cand and s.name == cand]
        if match:
            return match[0]
    match = [s for s in slides if p.name.startswith(s.name + ".")]
    if len(match) == 1:
        return match[0]
    if len(slides) == 1:
        return slides[0]
    raise LabelError(p, "cannot tell which slide it belongs to; name the slide")


def resolve_classes(p: Path, report: ImportReport, classes: Sequence[ClassInfo]) -> list[Shape]:
    """The report's shapes with project class indices (names matched case-insensitively)."""
    by_name = {c.name.lower(): c for c in classes}
    by_idx = {c.idx for c in classes}
    out: list[Shape] = []
    for shp in report.shapes:
        if shp.class_idx is not None:
            if shp.class_idx not in by_idx:
                raise LabelError(p, f"class index {shp.class_idx} is not a project class (indices: {sorted(by_idx)})")
            out.append((shp.class_idx, shp.geometry))
            continue
        info = by_name.get((shp.class_name or "").lower())
        if info is None:
            known = ", ".join(c.name for c in classes)
            raise LabelError(p, f"unknown class {shp.class_name!r} (project classes: {known}; a project's "
                                "classes are fixed when it is created)")
        out.append((info.idx, shp.geometry))
    return out


def _clip_to_slide(p: Path, shapes: list[Shape], row: SlideRow) -> tuple[list[Shape], tuple[str, ...]]:
    bounds = box(0, 0, row.width, row.height)
    clipped: list[Shape] = []
    outside = 0
    for cls, geom in shapes:
        if not geom.within(bounds):
            geom = geom.intersection(bounds)
            outside += 1
            if geom.is_empty or geom.area == 0:
                raise LabelError(p, f"a class-{cls} label lies outside the slide {row.name!r} "
                                    f"({row.width}x{row.height} px)")
        clipped.append((cls, geom))
    return clipped, ((f"clipped {outside} shape(s) to the slide bounds",) if outside else ())
