"""A slideloop project: a folder holding the database (``project.db``) and the files beside it.

This is the API the CLI and the apps call: register slides, build the patch grid, import/export and
correct labels, and report status. Every change is one transaction.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from PIL import Image
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry
from sqlalchemy import func, or_, select

from al_core._io import atomic_write_bytes
from al_core.errors import LabelError, ProjectError, SlideError
from al_core.grid import GridSpec, grid_boxes, tissue_fractions
from al_core.labels import (
    ImportReport,
    hex_to_rgb,
    rasterize,
    read_geojson,
    read_label_image,
    read_mask_tiles,
    to_geojson,
)
from al_core.slides import Slide, open_slide
from al_core.store import (
    AnnotationRow,
    ClassRow,
    GridRow,
    LabelVersionRow,
    PatchRow,
    ReviewRow,
    SlideRow,
    Store,
)
from al_core.tissue import TissueMask, compute_tissue

DB_NAME = "project.db"
#: environment variable with an SQLAlchemy URL that replaces the project's SQLite file (shared PostgreSQL)
DB_URL_ENV = "SLIDELOOP_DB_URL"
BACKGROUND = "Background"
DEFAULT_CLASSES = ("Epithelium:#c80000",)


@dataclass(frozen=True)
class ClassInfo:
    """A label class; ``idx`` is its pixel value in masks. Pixels of an ``ignore`` class count in no loss or metric."""

    idx: int
    name: str
    color: str
    ignore: bool = False

    @classmethod
    def parse(cls, spec: str, idx: int) -> ClassInfo:
        """Parse ``NAME:#RRGGBB`` or ``NAME:#RRGGBB:ignore``."""
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[0].strip() or (len(parts) == 3 and parts[2] != "ignore"):
            raise ValueError(f"class spec {spec!r}: expected NAME:#RRGGBB or NAME:#RRGGBB:ignore")
        hex_to_rgb(parts[1])
        return cls(idx, parts[0].strip(), parts[1].lower(), len(parts) == 3)


@dataclass(frozen=True)
class LabelImport:
    """The outcome of importing one label file into one slide."""

    slide: str
    version: int
    shapes: int
    notes: tuple[str, ...]


class Project:
    """Open with :meth:`open` or make with :meth:`create`."""

    def __init__(self, root: Path, store: Store) -> None:
        self.root = root
        self.store = store

    # --- lifecycle --------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike[str], classes: Sequence[str] = DEFAULT_CLASSES,
               db_url: str | None = None) -> Project:
        """Make a new project folder with its class list (Background, index 0, is implicit)."""
        path = Path(root)
        if (path / DB_NAME).exists():
            raise ProjectError(f"{path}: already a slideloop project")
        infos = [ClassInfo(0, BACKGROUND, "#000000")]
        for i, spec in enumerate(classes, start=1):
            info = ClassInfo.parse(spec, i)
            if info.name.lower() in {c.name.lower() for c in infos}:
                raise ValueError(f"class {info.name!r} given twice")
            infos.append(info)
        path.mkdir(parents=True, exist_ok=True)
        store = Store(db_url or _sqlite_url(path), create=True)
        with store.write() as s:
            s.add_all(ClassRow(idx=c.idx, name=c.name, color=c.color, ignore=c.ignore) for c in infos)
        return cls(path, store)

    @classmethod
    def open(cls, root: str | os.PathLike[str], db_url: str | None = None) -> Project:
        """Open a project folder; its database is ``db_url``, ``$SLIDELOOP_DB_URL`` (e.g. a shared PostgreSQL)
        or the folder's own SQLite file."""
        path = Path(root)
        db_url = db_url or os.environ.get(DB_URL_ENV) or None
        if db_url is None and not (path / DB_NAME).is_file():
            raise ProjectError(f"{path}: not a slideloop project (no {DB_NAME}; create one with 'slideloop init')")
        return cls(path, Store(db_url or _sqlite_url(path)))

    def close(self) -> None:
        self.store.dispose()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- classes ----------------------------------------------------------------------------------
    def classes(self) -> list[ClassInfo]:
        with self.store.read() as s:
            rows = s.scalars(select(ClassRow).order_by(ClassRow.idx)).all()
            return [ClassInfo(r.idx, r.name, r.color, r.ignore) for r in rows]

    def class_by_name(self) -> dict[str, ClassInfo]:
        return {c.name.lower(): c for c in self.classes()}

    # --- slides -----------------------------------------------------------------------------------
    def add_slide(self, path: str | os.PathLike[str], mpp: float | None = None, name: str | None = None) -> SlideRow:
        """Register a slide file: read its metadata, compute its tissue mask, store both."""
        p = Path(path).resolve()
        with open_slide(p, mpp=mpp) as slide:
            name = name or slide_name_for(p)
            with self.store.read() as s:
                if s.scalar(select(SlideRow.id).where(SlideRow.name == name)) is not None:
                    raise ProjectError(f"a slide named {name!r} is already in the project (use --name)")
            tissue = compute_tissue(slide)
            row = SlideRow(
                name=name, path=str(p), mpp=slide.mpp, mpp_from_user=mpp is not None,
                width=slide.dimensions[0], height=slide.dimensions[1], levels=slide.level_count,
                objective_power=slide.objective_power, vendor=slide.vendor,
                tissue_png=_png_bytes(tissue.mask), tissue_downsample=tissue.downsample,
                tissue_fraction=tissue.fraction,
            )
        with self.store.write() as s:
            s.add(row)
        return row

    def slides(self) -> list[SlideRow]:
        with self.store.read() as s:
            return list(s.scalars(select(SlideRow).order_by(SlideRow.id)).all())

    def slide_row(self, key: str | int) -> SlideRow:
        with self.store.read() as s:
            q = select(SlideRow).where(SlideRow.id == key if isinstance(key, int) else SlideRow.name == key)
            row = s.scalar(q)
        if row is None:
            names = ", ".join(r.name for r in self.slides()) or "none"
            raise ProjectError(f"no slide {key!r} in the project (slides: {names})")
        return row

    def open_slide(self, key: str | int | SlideRow) -> Slide:
        """Open a registered slide with the mpp stored for it."""
        row = key if isinstance(key, SlideRow) else self.slide_row(key)
        slide = open_slide(row.path, mpp=row.mpp if row.mpp_from_user else None)
        if slide.mpp is None and row.mpp is not None:
            slide.mpp = row.mpp
        return slide

    def tissue(self, key: str | int | SlideRow) -> TissueMask:
        row = key if isinstance(key, SlideRow) else self.slide_row(key)
        if row.tissue_png is None or row.tissue_downsample is None:
            raise ProjectError(f"slide {row.name!r} has no tissue mask")
        mask = np.asarray(Image.open(io.BytesIO(row.tissue_png))) > 0
        return TissueMask(mask, row.tissue_downsample)

    # --- grid -------------------------------------------------------------------------------------
    def build_grid(self, spec: GridSpec) -> int:
        """Cut every slide into patches, drop those under ``spec.min_tissue``, store them as a new grid."""
        rows: list[dict[str, Any]] = []
        for slide in self.slides():
            try:
                ds = spec.downsample_for(slide.mpp)
            except ValueError as err:
                raise SlideError(slide.path, str(err)) from err
            boxes = grid_boxes(slide.width, slide.height, spec, ds)
            t = self.tissue(slide)
            frac = tissue_fractions(boxes, t.mask, t.downsample)
            keep = np.flatnonzero(frac >= spec.min_tissue)
            rows.extend(
                dict(slide_id=slide.id, col=int(boxes.col[i]), row=int(boxes.row[i]), x=int(boxes.x[i]),
                     y=int(boxes.y[i]), size=boxes.size, patch=spec.patch, downsample=ds, tissue=float(frac[i]))
                for i in keep
            )
        with self.store.write() as s:
            grid = GridRow(spec=json.dumps(spec.to_dict()))
            s.add(grid)
            s.flush()
            s.execute(PatchRow.__table__.insert(), [dict(r, grid_id=grid.id) for r in rows]) if rows else None
            return grid.id

    def grid_id(self) -> int | None:
        with self.store.read() as s:
            return s.scalar(select(func.max(GridRow.id)))

    def grid_spec(self) -> GridSpec | None:
        gid = self.grid_id()
        if gid is None:
            return None
        with self.store.read() as s:
            return GridSpec.from_dict(json.loads(s.get(GridRow, gid).spec))  # type: ignore[union-attr]

    def patches(self, slide: str | int | None = None) -> list[PatchRow]:
        """Patches of the current grid (of one slide, or all)."""
        gid = self.grid_id()
        if gid is None:
            return []
        q = select(PatchRow).where(PatchRow.grid_id == gid)
        if slide is not None:
            q = q.where(PatchRow.slide_id == self.slide_row(slide).id)
        with self.store.read() as s:
            return list(s.scalars(q.order_by(PatchRow.slide_id, PatchRow.row, PatchRow.col)).all())

    def patch(self, patch_id: int) -> PatchRow:
        with self.store.read() as s:
            row = s.get(PatchRow, patch_id)
        if row is None:
            raise ProjectError(f"no patch {patch_id} in the project")
        return row

    def read_patch(self, patch: PatchRow, slide: Slide | None = None) -> npt.NDArray[np.uint8]:
        """The RGB pixels of a patch (``patch`` x ``patch``), read from the slide's best level."""
        own = slide is None
        slide = slide or self.open_slide(patch.slide_id)
        try:
            return slide.read((patch.x, patch.y), (patch.patch, patch.patch), downsample=patch.downsample)
        finally:
            if own:
                slide.close()

    # --- labels -----------------------------------------------------------------------------------
    def import_labels(self, path: str | os.PathLike[str], slide: str | None = None,
                      author: str = "import") -> LabelImport:
        """Import a QuPath GeoJSON file, a mask-tile folder, or a slide-sized label image as a new label version."""
        p = Path(path)
        if not p.exists():
            raise LabelError(p, "file not found")
        if p.is_dir():
            report = read_mask_tiles(p)
        elif p.suffix.lower() in (".geojson", ".json"):
            report = read_geojson(p)
        else:
            row = self.slide_row(slide) if slide else self._slide_for_file(p, None)
            report = read_label_image(p, (row.width, row.height))
        row = self.slide_row(slide) if slide else self._slide_for_file(p, report.slide_hint)
        shapes = self._resolve_classes(p, report)
        notes = list(report.notes)
        bounds = box(0, 0, row.width, row.height)
        clipped: list[tuple[int, BaseGeometry]] = []
        outside = 0
        for cls, geom in shapes:
            if not geom.within(bounds):
                geom = geom.intersection(bounds)
                outside += 1
                if geom.is_empty or geom.area == 0:
                    raise LabelError(p, f"a {cls=} label lies outside the slide {row.name!r} "
                                        f"({row.width}x{row.height} px)")
            clipped.append((cls, geom))
        if outside:
            notes.append(f"clipped {outside} shape(s) to the slide bounds")
        version = self.add_label_version(row.id, clipped, author=author, source=str(p), message="import")
        return LabelImport(row.name, version, len(clipped), tuple(notes))

    def _slide_for_file(self, p: Path, hint: str | None) -> SlideRow:
        slides = self.slides()
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
        raise LabelError(p, "cannot tell which slide it belongs to; name it with --slide")

    def _resolve_classes(self, p: Path, report: ImportReport) -> list[tuple[int, BaseGeometry]]:
        by_name = self.class_by_name()
        by_idx = {c.idx for c in by_name.values()}
        out = []
        for shp in report.shapes:
            if shp.class_idx is not None:
                if shp.class_idx not in by_idx:
                    raise LabelError(p, f"class index {shp.class_idx} is not a project class "
                                        f"(indices: {sorted(by_idx)})")
                out.append((shp.class_idx, shp.geometry))
                continue
            info = by_name.get((shp.class_name or "").lower())
            if info is None:
                known = ", ".join(c.name for c in by_name.values())
                raise LabelError(p, f"unknown class {shp.class_name!r} (project classes: {known}; "
                                    "add it with 'slideloop init --classes' in a new project)")
            out.append((info.idx, shp.geometry))
        return out

    def add_label_version(self, slide_id: int, shapes: Iterable[tuple[int, BaseGeometry]], *, author: str,
                          source: str = "", message: str = "", retire: Iterable[int] = (),
                          patch_id: int | None = None, action: str = "") -> int:
        """Append a label version: retire annotation ids, add shapes; one transaction. Returns the version."""
        with self.store.write() as s:
            version = (s.scalar(select(func.max(LabelVersionRow.version))
                                .where(LabelVersionRow.slide_id == slide_id)) or 0) + 1
            s.add(LabelVersionRow(slide_id=slide_id, version=version, author=author, source=source,
                                  message=message))
            ids = list(retire)
            if ids:
                s.query(AnnotationRow).filter(AnnotationRow.id.in_(ids), AnnotationRow.slide_id == slide_id,
                                              AnnotationRow.retired_version.is_(None)) \
                    .update({AnnotationRow.retired_version: version}, synchronize_session=False)
            for cls, geom in shapes:
                if geom.is_empty:
                    continue
                minx, miny, maxx, maxy = geom.bounds
                s.add(AnnotationRow(slide_id=slide_id, class_idx=cls, wkb=shapely.to_wkb(geom), minx=minx,
                                    miny=miny, maxx=maxx, maxy=maxy, author=author, created_version=version))
            if patch_id is not None:
                s.add(ReviewRow(patch_id=patch_id, label_version=version, author=author, action=action or message))
            return version

    def label_version(self, slide: str | int) -> int:
        sid = self.slide_row(slide).id
        with self.store.read() as s:
            return s.scalar(select(func.max(LabelVersionRow.version)).where(LabelVersionRow.slide_id == sid)) or 0

    def annotations(self, slide: str | int, version: int | None = None,
                    region: tuple[float, float, float, float] | None = None) -> list[tuple[int, int, BaseGeometry]]:
        """(annotation id, class index, geometry) alive at ``version`` (default: latest), oldest first,
        optionally only those whose bounding box meets ``region`` (minx, miny, maxx, maxy)."""
        sid = self.slide_row(slide).id
        q = select(AnnotationRow).where(AnnotationRow.slide_id == sid)
        if version is None:
            q = q.where(AnnotationRow.retired_version.is_(None))
        else:
            q = q.where(AnnotationRow.created_version <= version,
                        or_(AnnotationRow.retired_version.is_(None), AnnotationRow.retired_version > version))
        if region is not None:
            x0, y0, x1, y1 = region
            q = q.where(AnnotationRow.maxx >= x0, AnnotationRow.minx <= x1,
                        AnnotationRow.maxy >= y0, AnnotationRow.miny <= y1)
        with self.store.read() as s:
            rows = s.scalars(q.order_by(AnnotationRow.id)).all()
            return [(r.id, r.class_idx, shapely.from_wkb(r.wkb)) for r in rows]

    def label_mask(self, patch: PatchRow, version: int | None = None) -> npt.NDArray[np.uint8]:
        """The class-index mask of a patch at its output size, from the label geometry (background elsewhere)."""
        region = (patch.x, patch.y, patch.x + patch.size, patch.y + patch.size)
        shapes = [(c, g) for _, c, g in self.annotations(patch.slide_id, version, region)]
        return rasterize(shapes, (patch.x, patch.y), patch.downsample, (patch.patch, patch.patch))

    def correct(self, slide: str | int, region: BaseGeometry, class_idx: int | None, *, author: str,
                patch_id: int | None = None) -> int:
        """Paint ``region`` with ``class_idx`` (``None`` or 0 erases to background) as a new label version.

        Annotations under the region are retired and re-added without it, so the history keeps them.
        """
        row = self.slide_row(slide)
        region = shapely.make_valid(region).intersection(box(0, 0, row.width, row.height))
        if region.is_empty or region.area == 0:
            raise LabelError(f"slide {row.name}", "the drawn region lies outside the slide or has no area")
        if class_idx not in (None, 0) and class_idx not in {c.idx for c in self.classes()}:
            raise LabelError(f"slide {row.name}", f"unknown class index {class_idx}")
        retire, keep = [], []
        for aid, cls, geom in self.annotations(row.id, region=region.bounds):
            if geom.intersects(region):
                retire.append(aid)
                rest = geom.difference(region)
                if not rest.is_empty and rest.area > 0:
                    keep.append((cls, rest))
        if class_idx not in (None, 0):
            keep.append((int(class_idx), region))  # type: ignore[arg-type]
        return self.add_label_version(row.id, keep, author=author, retire=retire, patch_id=patch_id,
                                      message="correction", action="erase" if class_idx in (None, 0) else "paint")

    def mark_reviewed(self, patch_id: int, author: str, action: str = "reviewed") -> None:
        patch = self.patch(patch_id)
        with self.store.write() as s:
            version = s.scalar(select(func.max(LabelVersionRow.version))
                               .where(LabelVersionRow.slide_id == patch.slide_id)) or 0
            s.add(ReviewRow(patch_id=patch_id, label_version=version, author=author, action=action))

    def export_labels(self, out: str | os.PathLike[str], slide: str | None = None) -> int:
        """Write the current labels as QuPath GeoJSON (one file; with several slides, ``slide`` is required)."""
        slides = [self.slide_row(slide)] if slide else self.slides()
        if len(slides) != 1:
            raise ProjectError("the project has several slides; choose one with --slide")
        classes = {c.idx: c for c in self.classes()}
        shapes = [(g, classes[c].name, classes[c].color) for _, c, g in self.annotations(slides[0].id)]
        atomic_write_bytes(out, json.dumps(to_geojson(shapes)).encode())
        return len(shapes)

    # --- status -----------------------------------------------------------------------------------
    def labelled_patch_ids(self, slide: str | int | None = None) -> set[int]:
        """Patches that intersect label geometry or were reviewed (unlabelled pixels count as background)."""
        out: set[int] = set()
        patches = self.patches(slide)
        by_slide: dict[int, list[PatchRow]] = {}
        for p in patches:
            by_slide.setdefault(p.slide_id, []).append(p)
        for sid, plist in by_slide.items():
            geoms = [g for _, _, g in self.annotations(sid)]
            if geoms:
                tree = shapely.STRtree(geoms)
                boxes = [box(p.x, p.y, p.x + p.size, p.y + p.size) for p in plist]
                hit, _ = tree.query(boxes, predicate="intersects")
                out.update(plist[i].id for i in set(hit.tolist()))
        with self.store.read() as s:
            reviewed = s.scalars(select(ReviewRow.patch_id).distinct()).all()
        ids = {p.id for p in patches}
        out.update(r for r in reviewed if r in ids)
        return out

    def status(self) -> dict[str, Any]:
        """Slides, patches, tissue and labelled/unlabelled counts, as plain data."""
        spec = self.grid_spec()
        labelled = self.labelled_patch_ids()
        patches = self.patches()
        slides = []
        for r in self.slides():
            mine = [p for p in patches if p.slide_id == r.id]
            n_lab = sum(1 for p in mine if p.id in labelled)
            slides.append({
                "id": r.id, "name": r.name, "path": r.path, "width": r.width, "height": r.height,
                "levels": r.levels, "mpp": r.mpp, "objective_power": r.objective_power, "vendor": r.vendor,
                "tissue_fraction": round(r.tissue_fraction or 0.0, 4),
                "patches": len(mine), "labelled": n_lab, "unlabelled": len(mine) - n_lab,
                "label_version": self.label_version(r.id), "file_present": Path(r.path).exists(),
            })
        return {
            "project": str(self.root),
            "classes": [c.__dict__ for c in self.classes()],
            "grid": spec.to_dict() if spec else None,
            "slides": slides,
            "totals": {
                "slides": len(slides), "patches": len(patches), "labelled": len(labelled),
                "unlabelled": len(patches) - len(labelled),
            },
        }


def slide_name_for(path: Path) -> str:
    """A slide's default name: the file name without its (double) suffix (``x.ome.tif`` → ``x``)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{(path / DB_NAME).resolve()}"


def _png_bytes(mask: npt.NDArray[np.bool_]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
