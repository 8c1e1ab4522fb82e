"""Label versions: the append-only history of each slide's label geometry, and edits to it.

Every change is one transaction that reads what it changes and writes the new version together: on SQLite the
write lock is taken first (``BEGIN IMMEDIATE``), on PostgreSQL the slide's row is locked (``FOR UPDATE``).
So two annotators saving at once both get their edit in, one after the other. An edit drawn on an older
version (``base_version``) that overlaps geometry changed since then is refused (:class:`LabelConflictError`)
instead of silently undoing the other edit; disjoint edits are both kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry
from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from al_core.errors import LabelError
from al_core.project.schema import AnnotationRow, LabelVersionRow, PatchRow, ReviewRow, SlideRow
from al_core.project.store import Store

#: (class index, geometry in level-0 px)
Shape = tuple[int, BaseGeometry]
#: a level-0 bounding box (minx, miny, maxx, maxy)
Box = tuple[float, float, float, float]


class Annotation(NamedTuple):
    """One polygon of one class, as stored."""

    id: int
    class_idx: int
    geometry: BaseGeometry


class LabelConflictError(LabelError):
    """An edit overlaps geometry that someone else changed after the edit was started."""


@dataclass(frozen=True)
class VersionInfo:
    """One label version of a slide: who made it, when and why."""

    version: int
    author: str
    created_at: str
    message: str
    source: str


class LabelVersions:
    """The label geometry of a project's slides, version by version."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # --- reading ------------------------------------------------------------------------------------
    def version(self, slide_id: int) -> int:
        """The slide's newest label version (0: never labelled)."""
        with self.store.read() as s:
            return _current_version(s, slide_id)

    def history(self, slide_id: int) -> list[VersionInfo]:
        """Every label version of the slide, oldest first."""
        q = select(LabelVersionRow).where(LabelVersionRow.slide_id == slide_id).order_by(LabelVersionRow.version)
        with self.store.read() as s:
            return [VersionInfo(r.version, r.author, r.created_at, r.message, r.source) for r in s.scalars(q)]

    def annotations(self, slide_id: int, version: int | None = None, region: Box | None = None) -> list[Annotation]:
        """Annotations alive at ``version`` (default: latest), oldest first, optionally only those whose
        bounding box meets ``region``."""
        with self.store.read() as s:
            return _alive(s, slide_id, version, region)

    def mask(self, patch: PatchRow, version: int | None = None) -> npt.NDArray[np.uint8]:
        """The class-index mask of a patch at its output size (background where nothing is drawn)."""
        from al_core.wsi.raster import rasterize  # rasterio: only when a mask is drawn

        region = (patch.x, patch.y, patch.x + patch.size, patch.y + patch.size)
        shapes = [(a.class_idx, a.geometry) for a in self.annotations(patch.slide_id, version, region)]
        return rasterize(shapes, (patch.x, patch.y), patch.downsample, (patch.patch, patch.patch))

    def reviewed_regions(self, slide_id: int | None = None) -> list[tuple[int, int, int, int]]:
        """(slide id, x, y, size) of every region a reviewer saved or marked reviewed."""
        q = select(ReviewRow.slide_id, ReviewRow.x, ReviewRow.y, ReviewRow.size).where(
            ReviewRow.slide_id.is_not(None), ReviewRow.x.is_not(None), ReviewRow.y.is_not(None),
            ReviewRow.size.is_not(None))
        if slide_id is not None:
            q = q.where(ReviewRow.slide_id == slide_id)
        with self.store.read() as s:
            return [(int(a or 0), int(b or 0), int(c or 0), int(d or 0)) for a, b, c, d in s.execute(q.distinct()).all()]

    # --- writing ------------------------------------------------------------------------------------
    def add(self, slide_id: int, shapes: Iterable[Shape], *, author: str, source: str = "",
            message: str = "") -> int:
        """Append a version that adds ``shapes`` (an import, a pre-annotation); returns the version."""
        with self.store.write() as s:
            _lock_slide(s, slide_id)
            version = _new_version(s, slide_id, author, source, message)
            _insert(s, slide_id, version, shapes, author)
            return version

    def edit(self, slide_id: int, region: BaseGeometry, shapes: Sequence[Shape], *, author: str, message: str,
             action: str, patch: PatchRow | None = None, base_version: int | None = None,
             only_class: int | None = None) -> int:
        """Replace what lies inside ``region`` by ``shapes`` (clipped to it) in one new version.

        Annotations under the region are retired and re-added without it, so the history keeps them;
        with ``only_class`` only that class's annotations are (a class-aware eraser).
        ``base_version`` is the version the edit was drawn on: geometry changed after it that overlaps the
        region raises :class:`LabelConflictError`. ``patch`` records the review of that patch's region.
        """
        with self.store.write() as s:
            row = _lock_slide(s, slide_id)
            region = _clip(region, row)
            current = _current_version(s, slide_id)
            if base_version is not None and base_version < current:
                _check_conflicts(s, row, region, base_version)
            retire, keep = [], []
            for ann in _alive(s, slide_id, None, region.bounds):
                if only_class is not None and ann.class_idx != only_class:
                    continue
                if ann.geometry.intersects(region):
                    retire.append(ann.id)
                    rest = ann.geometry.difference(region)
                    if not rest.is_empty and rest.area > 0:
                        keep.append((ann.class_idx, rest))
            keep += [(c, g.intersection(region)) for c, g in shapes if c != 0]
            version = _new_version(s, slide_id, author, "", message)
            if retire:
                s.query(AnnotationRow).filter(AnnotationRow.id.in_(retire), AnnotationRow.retired_version.is_(None)) \
                    .update({AnnotationRow.retired_version: version}, synchronize_session=False)
            _insert(s, slide_id, version, keep, author)
            if patch is not None:
                _review(s, patch, version, author, action)
            return version

    def correct(self, slide_id: int, region: BaseGeometry, class_idx: int | None, *, author: str,
                patch: PatchRow | None = None, base_version: int | None = None) -> int:
        """Paint ``region`` with ``class_idx`` (``None`` or 0 erases to background) as a new version."""
        erase = class_idx in (None, 0)
        shapes: list[Shape] = [] if erase else [(int(class_idx), region)]  # type: ignore[arg-type]
        return self.edit(slide_id, region, shapes, author=author, message="correction",
                         action="erase" if erase else "paint", patch=patch, base_version=base_version)

    def revert(self, slide_id: int, region: BaseGeometry, to_version: int, *, author: str,
               patch: PatchRow | None = None) -> int:
        """Make ``region`` look as it did at ``to_version`` again (a new version; nothing is deleted)."""
        old = [(a.class_idx, a.geometry) for a in self.annotations(slide_id, to_version, region.bounds)]
        return self.edit(slide_id, region, old, author=author, message=f"revert to version {to_version}",
                         action="revert", patch=patch)

    def replace(self, slide_id: int, annotation_id: int, class_idx: int | None, geometry: BaseGeometry | None, *,
                author: str, message: str, patch: PatchRow | None = None) -> int:
        """Retire one alive annotation and, unless ``class_idx`` is 0, add it back with the new class and/or
        geometry (``None``: unchanged), in one new version: delete a polygon, change its class, move its
        vertices. The re-added polygon is drawn above the others."""
        from al_core.wsi.raster import polygonal_part  # rasterio: only when a geometry is edited

        with self.store.write() as s:
            row = _lock_slide(s, slide_id)
            ann = s.get(AnnotationRow, annotation_id)
            if ann is None or ann.slide_id != slide_id or ann.retired_version is not None:
                raise LabelError(f"slide {row.name}", f"annotation {annotation_id} is not in the current labels")
            new_cls = ann.class_idx if class_idx is None else int(class_idx)
            geom = shapely.from_wkb(ann.wkb) if geometry is None else polygonal_part(_clip(geometry, row))
            version = _new_version(s, slide_id, author, "", message)
            ann.retired_version = version
            if new_cls:
                _insert(s, slide_id, version, [(new_cls, geom)], author)
            if patch is not None:
                _review(s, patch, version, author, "edit")
            return version

    def mark_reviewed(self, patch: PatchRow, author: str, action: str = "reviewed") -> None:
        """Record that a reviewer looked at a patch and left its labels as they are."""
        with self.store.write() as s:
            _review(s, patch, _current_version(s, patch.slide_id), author, action)


# --- one transaction's pieces ------------------------------------------------------------------------


def _lock_slide(s: Session, slide_id: int) -> SlideRow:
    # serialises writers of one slide on PostgreSQL (SQLite's BEGIN IMMEDIATE already did it for the file)
    row = s.scalar(select(SlideRow).where(SlideRow.id == slide_id).with_for_update())
    if row is None:
        raise LabelError(f"slide {slide_id}", "no such slide in the project")
    return row


def _current_version(s: Session, slide_id: int) -> int:
    q = select(func.max(LabelVersionRow.version)).where(LabelVersionRow.slide_id == slide_id)
    return int(s.scalar(q) or 0)


def _new_version(s: Session, slide_id: int, author: str, source: str, message: str) -> int:
    version = _current_version(s, slide_id) + 1
    s.add(LabelVersionRow(slide_id=slide_id, version=version, author=author, source=source, message=message))
    return version


def _alive(s: Session, slide_id: int, version: int | None, region: Box | None) -> list[Annotation]:
    q = select(AnnotationRow).where(AnnotationRow.slide_id == slide_id)
    if version is None:
        q = q.where(AnnotationRow.retired_version.is_(None))
    else:
        q = q.where(AnnotationRow.created_version <= version,
                    or_(AnnotationRow.retired_version.is_(None), AnnotationRow.retired_version > version))
    if region is not None:
        q = q.where(*_bbox_meets(region))
    return [Annotation(r.id, r.class_idx, shapely.from_wkb(r.wkb)) for r in s.scalars(q.order_by(AnnotationRow.id))]


def _bbox_meets(region: Box) -> tuple[ColumnElement[bool], ...]:
    x0, y0, x1, y1 = region
    return (AnnotationRow.maxx >= x0, AnnotationRow.minx <= x1, AnnotationRow.maxy >= y0, AnnotationRow.miny <= y1)


def _check_conflicts(s: Session, slide: SlideRow, region: BaseGeometry, base_version: int) -> None:
    changed = select(AnnotationRow).where(
        AnnotationRow.slide_id == slide.id, *_bbox_meets(region.bounds),
        or_(AnnotationRow.created_version > base_version, AnnotationRow.retired_version > base_version))
    touching = [r for r in s.scalars(changed) if shapely.from_wkb(r.wkb).intersects(region)]
    # an edit elsewhere retires the polygons it cuts and re-adds their rest unchanged: only a difference of
    # what the region shows (at least a pixel) is a conflict, so disjoint edits of one big polygon both go in
    if touching and _region_differs(_painted(s, slide.id, base_version, region),
                                    _painted(s, slide.id, None, region)):
        newest = max(v for r in touching for v in (r.created_version, r.retired_version or 0) if v > base_version)
        author = s.scalar(select(LabelVersionRow.author).where(LabelVersionRow.slide_id == slide.id,
                                                               LabelVersionRow.version == newest))
        raise LabelConflictError(
            f"slide {slide.name}",
            f"this region was changed by {author} after you started (version {base_version}); "
            "look at the current labels and redo the edit")


def _painted(s: Session, slide_id: int, version: int | None, region: BaseGeometry) -> dict[int, BaseGeometry]:
    """Per class, the part of ``region`` it shows at ``version`` (later annotations paint over earlier ones)."""
    out: dict[int, BaseGeometry] = {}
    for ann in _alive(s, slide_id, version, region.bounds):
        geom = ann.geometry.intersection(region)
        if geom.is_empty:
            continue
        out = {c: g.difference(geom) for c, g in out.items()}
        out[ann.class_idx] = out[ann.class_idx].union(geom) if ann.class_idx in out else geom
    return out


def _region_differs(a: dict[int, BaseGeometry], b: dict[int, BaseGeometry], min_area: float = 1.0) -> bool:
    empty = shapely.Polygon()
    return any(a.get(c, empty).symmetric_difference(b.get(c, empty)).area >= min_area for c in set(a) | set(b) if c)


def _clip(region: BaseGeometry, slide: SlideRow) -> BaseGeometry:
    region = shapely.make_valid(region).intersection(box(0, 0, slide.width, slide.height))
    if region.is_empty or region.area == 0:
        raise LabelError(f"slide {slide.name}", "the drawn region lies outside the slide or has no area")
    return region


def _insert(s: Session, slide_id: int, version: int, shapes: Iterable[Shape], author: str) -> None:
    for cls, geom in shapes:
        if geom.is_empty or geom.area == 0:
            continue
        minx, miny, maxx, maxy = geom.bounds
        s.add(AnnotationRow(slide_id=slide_id, class_idx=int(cls), wkb=shapely.to_wkb(geom), minx=minx, miny=miny,
                            maxx=maxx, maxy=maxy, author=author, created_version=version))


def _review(s: Session, patch: PatchRow, version: int, author: str, action: str) -> None:
    s.add(ReviewRow(patch_id=patch.id, slide_id=patch.slide_id, x=patch.x, y=patch.y, size=patch.size,
                    label_version=version, author=author, action=action))
