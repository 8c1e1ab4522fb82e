"""A slideloop project: a folder holding the database (``project.db``) and the files beside it.

:class:`Project` is the facade a script, the CLI and the apps use: slides, the patch grid, labels and their
versions, and the loop itself (train, predict, review queue, metrics, export). Each method is a thin call into
the module that does the work; heavy modules (torch, ONNX Runtime) are imported only when a method needs them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from al_core._constants import PROJECT_ENV as PROJECT_ENV
from al_core._guards import check_free_space, check_output
from al_core._io import atomic_write_bytes
from al_core.errors import LabelError, NoTissueError, ProjectError
from al_core.project.classes import BACKGROUND, DEFAULT_CLASSES, ClassInfo
from al_core.project.models import ModelRef, ModelVersions
from al_core.project.schema import AnnotationRow, ClassRow, GridRow, PatchRow, SlideRow
from al_core.project.store import Store
from al_core.wsi.grid import GridSpec

# shapely, the slide readers (tiffslide), rasterio and scipy are imported by the methods that need them: opening
# a project (``slideloop status``, the apps' first paint) must not pay for them
if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import pandas as pd
    from shapely.geometry.base import BaseGeometry

    from al_core.deploy.project_export import ExportResult
    from al_core.deploy.registry import DeployedModel
    from al_core.learn.predict import PredictResult
    from al_core.learn.predictions import PredictionStore
    from al_core.learn.train import TrainOptions, TrainResult
    from al_core.project.labels import Annotation, Box, LabelVersions
    from al_core.wsi.slides import Slide
    from al_core.wsi.tissue import TissueMask

log = logging.getLogger(__name__)

DB_NAME = "project.db"
#: environment variable with an SQLAlchemy URL that replaces the project's SQLite file (shared PostgreSQL)
DB_URL_ENV = "SLIDELOOP_DB_URL"
SlideKey = str | int | SlideRow


@dataclass(frozen=True)
class LabelImport:
    """The outcome of importing one label file into one slide."""

    slide: str
    version: int
    shapes: int
    notes: tuple[str, ...]


class Project:
    """A project folder and its database. Open with :meth:`open` or make with :meth:`create`.

    ``labels`` holds the label versions, ``models`` the model versions; the methods below cover the loop.
    """

    def __init__(self, root: Path, store: Store) -> None:
        self.root = root
        self.store = store
        self.models = ModelVersions(store, root)
        self._labels: LabelVersions | None = None
        self._predictions: PredictionStore | None = None

    # --- lifecycle --------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike[str], classes: Sequence[str] = DEFAULT_CLASSES,
               db_url: str | None = None) -> Project:
        """Make a new project folder with its class list (``NAME:#RRGGBB[:ignore]``; Background is implicit)."""
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
            raise ProjectError(f"{path}: not a slideloop project (no {DB_NAME})")
        return cls(path, Store(db_url or _sqlite_url(path)))

    def close(self) -> None:
        """Release the database connections."""
        self.store.dispose()

    def snapshot(self, reason: str) -> Path | None:
        """Copy the SQLite database into ``snapshots/`` to restore from later (:mod:`al_core.project.integrity`);
        ``None`` on a server database or a disk too full for the copy."""
        from al_core.project.integrity import take_snapshot

        snap = take_snapshot(self.store.file, reason) if self.store.file is not None else None
        return None if snap is None else snap.path

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Project({str(self.root)!r})"

    @property
    def labels(self) -> LabelVersions:
        """The slides' label versions (history, annotations, edits, revert)."""
        if self._labels is None:
            from al_core.project.labels import LabelVersions

            self._labels = LabelVersions(self.store)
        return self._labels

    # --- classes and slides -----------------------------------------------------------------------
    def classes(self) -> list[ClassInfo]:
        """The label classes, Background (0) first."""
        with self.store.read() as s:
            rows = s.scalars(select(ClassRow).order_by(ClassRow.idx)).all()
            return [ClassInfo(r.idx, r.name, r.color, r.ignore) for r in rows]

    def add_slide(self, path: str | os.PathLike[str], mpp: float | None = None, name: str | None = None) -> SlideRow:
        """Register a slide file (its metadata and tissue mask); ``mpp`` supplies or overrides its µm/px."""
        from al_core.project.slides import describe_slide, slide_name_for

        p = Path(path).resolve()
        row = describe_slide(p, name or slide_name_for(p), mpp)
        taken = ProjectError(f"a slide named {row.name!r} is already in the project; give another name")
        try:
            with self.store.write() as s:
                if s.scalar(select(SlideRow.id).where(SlideRow.name == row.name)) is not None:
                    raise taken
                s.add(row)
        except IntegrityError as err:  # another process added the same name between our check and commit
            raise taken from err
        if row.mpp is None:
            log.warning("warning: slide %s (%s) has no µm/px metadata: added as uncalibrated; its patch grid needs "
                        "a downsample, or give its µm/px", row.name, p)
        return row

    def slides(self) -> list[SlideRow]:
        """Registered slides, in the order they were added."""
        with self.store.read() as s:
            return list(s.scalars(select(SlideRow).order_by(SlideRow.id)).all())

    def slide_row(self, key: SlideKey) -> SlideRow:
        """A registered slide by id or name."""
        if isinstance(key, SlideRow):
            return key
        with self.store.read() as s:
            q = select(SlideRow).where(SlideRow.id == key if isinstance(key, int) else SlideRow.name == key)
            row = s.scalar(q)
        if row is None:
            names = ", ".join(r.name for r in self.slides()) or "none"
            raise ProjectError(f"no slide {key!r} in the project (slides: {names})")
        return row

    def open_slide(self, key: SlideKey) -> Slide:
        """Open a registered slide with the µm/px stored for it."""
        from al_core.project.slides import open_registered

        return open_registered(self.slide_row(key))

    def tissue(self, key: SlideKey) -> TissueMask:
        """The slide's stored tissue mask."""
        from al_core.project.slides import stored_tissue

        return stored_tissue(self.slide_row(key))

    # --- grid ---------------------------------------------------------------------------------------
    def build_grid(self, spec: GridSpec | None = None, **kwargs: Any) -> int:
        """Cut every slide into patches (``spec``, or :class:`GridSpec` fields as keywords) and store them as the
        project's new grid; returns its id. A spec without a scale is stored at the default µm/px, so the scale
        a model is trained at is always known; slides without µm/px then need a ``downsample`` grid."""
        from al_core.project.patches import patch_rows
        from al_core.project.scale import resolve_grid
        from al_core.project.slides import stored_tissue

        spec = resolve_grid(spec or GridSpec(**kwargs))
        rows = patch_rows(self.slides(), spec, stored_tissue)
        for name in self.slides_without_patches(rows):
            log.warning("warning: slide %s yields no tissue patches (no tissue found, or none reaching the "
                        "grid's minimum tissue share); it has no review queue", name)
        check_free_space(self.root, len(rows) * spec.patch ** 2 * 3,
                         f"the patch cache of this grid ({len(rows):,} patches of {spec.patch} px)")
        with self.store.write() as s:
            grid = GridRow(spec=json.dumps(spec.to_dict()))
            s.add(grid)
            s.flush()
            if rows:
                s.execute(insert(PatchRow), [dict(r, grid_id=grid.id) for r in rows])
            return grid.id

    def slides_without_patches(self, rows: Sequence[dict[str, Any]] | None = None) -> list[str]:
        """Names of the slides the grid (``rows``, default the current grid) has no patch of."""
        have = {r["slide_id"] for r in rows} if rows is not None else {p.slide_id for p in self.patches()}
        return [s.name for s in self.slides() if s.id not in have]

    def grid_id(self) -> int | None:
        """The id of the current (newest) grid."""
        with self.store.read() as s:
            return s.scalar(select(func.max(GridRow.id)))

    def grid_spec(self) -> GridSpec | None:
        """The current grid's spec."""
        gid = self.grid_id()
        if gid is None:
            return None
        with self.store.read() as s:
            row = s.get(GridRow, gid)
            return GridSpec.from_dict(json.loads(row.spec)) if row else None

    def patches(self, slide: SlideKey | None = None) -> list[PatchRow]:
        """Patches of the current grid (of one slide, or all), in slide and raster order."""
        gid = self.grid_id()
        if gid is None:
            return []
        q = select(PatchRow).where(PatchRow.grid_id == gid)
        if slide is not None:
            q = q.where(PatchRow.slide_id == self.slide_row(slide).id)
        with self.store.read() as s:
            return list(s.scalars(q.order_by(PatchRow.slide_id, PatchRow.row, PatchRow.col)).all())

    def patch(self, patch_id: int) -> PatchRow:
        """One patch by id (of any grid)."""
        with self.store.read() as s:
            row = s.get(PatchRow, patch_id)
        if row is None:
            raise ProjectError(f"no patch {patch_id} in the project")
        return row

    def read_patch(self, patch: PatchRow, slide: Slide | None = None) -> npt.NDArray[np.uint8]:
        """The RGB pixels of a patch (``patch`` x ``patch``), read from the slide's best level."""
        if slide is not None:
            return slide.read((patch.x, patch.y), (patch.patch, patch.patch), downsample=patch.downsample)
        with self.open_slide(patch.slide_id) as own:
            return own.read((patch.x, patch.y), (patch.patch, patch.patch), downsample=patch.downsample)

    # --- labels -------------------------------------------------------------------------------------
    def import_labels(self, path: str | os.PathLike[str], slide: SlideKey | None = None,
                      author: str = "import") -> LabelImport:
        """Import a QuPath GeoJSON file, a mask-tile folder or a slide-sized label image as a new label version."""
        from al_core.project.label_import import read_label_file

        p = Path(path)
        f = read_label_file(p, self.slides(), self.classes(), self.slide_row(slide) if slide else None)
        version = self.labels.add(f.slide.id, f.shapes, author=author, source=str(p), message="import")
        return LabelImport(f.slide.name, version, len(f.shapes), f.notes)

    def export_labels(self, out: str | os.PathLike[str], slide: SlideKey | None = None) -> int:
        """Write the current labels as QuPath GeoJSON (one file; with several slides, ``slide`` is required)."""
        from al_core.project.labels_io import geojson_bytes

        slides = [self.slide_row(slide)] if slide else self.slides()
        if len(slides) != 1:
            raise ProjectError("the project has several slides; choose the slide to export")
        check_output(out, what="GeoJSON")
        classes = {c.idx: c for c in self.classes()}
        shapes = [(a.geometry, classes[a.class_idx].name, classes[a.class_idx].color)
                  for a in self.labels.annotations(slides[0].id)]
        atomic_write_bytes(out, geojson_bytes(shapes))
        return len(shapes)

    def preannotate(self, slide: SlideKey, class_idx: int, author: str = "preannotate") -> tuple[int, float]:
        """A first-pass label of ``class_idx`` from a hematoxylin threshold, as a new version; returns the
        version and the share of the slide it covers."""
        from al_core.project.slides import open_registered, stored_tissue
        from al_core.wsi.preannotate import preannotate

        row = self.slide_row(slide)
        tissue = stored_tissue(row)
        if not tissue.mask.any():
            raise NoTissueError(row.name, "no tissue was found on the slide, so there is nothing to pre-annotate")
        with open_registered(row) as s:
            shapes = preannotate(s, class_idx, tissue.mask, tissue.downsample)
        if not shapes:
            raise NoTissueError(row.name, "the hematoxylin threshold found nothing in its tissue; no label made")
        version = self.labels.add(row.id, shapes, author=author, source="hematoxylin threshold",
                                  message="pre-annotation (uncorrected)")
        return version, sum(g.area for _, g in shapes) / (row.width * row.height)

    def label_version(self, slide: SlideKey) -> int:
        """The slide's newest label version (0: never labelled)."""
        return self.labels.version(self.slide_row(slide).id)

    def annotations(self, slide: SlideKey, version: int | None = None, region: Box | None = None) -> list[Annotation]:
        """The slide's annotations alive at ``version`` (default: latest), optionally meeting ``region``."""
        return self.labels.annotations(self.slide_row(slide).id, version, region)

    def label_mask(self, patch: PatchRow, version: int | None = None) -> npt.NDArray[np.uint8]:
        """The class-index mask of a patch at its output size."""
        return self.labels.mask(patch, version)

    def correct(self, slide: SlideKey, region: BaseGeometry, class_idx: int | None, *, author: str = "script",
                patch_id: int | None = None, base_version: int | None = None) -> int:
        """Paint ``region`` (level-0 px) with ``class_idx`` (``None``/0 erases) as a new label version.

        ``base_version``: the version the correction was drawn on (see :meth:`LabelVersions.edit`);
        ``patch_id``: the patch being reviewed (it then counts as reviewed)."""
        row = self.slide_row(slide)
        if class_idx not in (None, 0) and class_idx not in {c.idx for c in self.classes()}:
            raise LabelError(f"slide {row.name}", f"unknown class index {class_idx}")
        patch = self.patch(patch_id) if patch_id is not None else None
        version = self.labels.correct(row.id, region, class_idx, author=author, patch=patch, base_version=base_version)
        self.rescore(row.id, region, patch_id, since=version - 1)
        return version

    def accept_prediction(self, patch_id: int, model: ModelRef = "active", *, author: str = "script",
                          region: BaseGeometry | None = None, base_version: int | None = None) -> int:
        """Take the model's stored prediction as the label of the patch (or only inside ``region``)."""
        from al_core.project.patches import patch_box
        from al_core.wsi.raster import mask_to_shapes

        patch = self.patch(patch_id)
        row = self.models.resolve(model)
        classes = self.predictions.classes(row.id, patch.id)
        shapes = mask_to_shapes(classes, offset=(patch.x, patch.y), scale=patch.size / classes.shape[1])
        area = patch_box(patch) if region is None else patch_box(patch).intersection(region)
        version = self.labels.edit(patch.slide_id, area, shapes, author=author, patch=patch,
                                   base_version=base_version, message=f"accept prediction of model {row.id}",
                                   action="accept")
        self.rescore(patch.slide_id, area, patch_id, since=version - 1)
        return version

    def erase(self, slide: SlideKey, region: BaseGeometry, class_idx: int | None = None, *, author: str = "script",
              patch_id: int | None = None, base_version: int | None = None) -> int:
        """Erase ``region`` to background, only from class ``class_idx`` when given, as a new label version."""
        row = self.slide_row(slide)
        patch = self.patch(patch_id) if patch_id is not None else None
        version = self.labels.edit(row.id, region, [], author=author, message="erase", action="erase", patch=patch,
                                   base_version=base_version, only_class=class_idx or None)
        self.rescore(row.id, region, patch_id, since=version - 1)
        return version

    def edit_annotation(self, slide: SlideKey, annotation_id: int, *, class_idx: int | None = None,
                        geometry: BaseGeometry | None = None, delete: bool = False, author: str = "script",
                        patch_id: int | None = None) -> int:
        """Change one saved polygon as a new label version: its class, its vertices (``geometry``), or
        ``delete`` it."""
        row = self.slide_row(slide)
        if class_idx not in (None, 0) and class_idx not in {c.idx for c in self.classes()}:
            raise LabelError(f"slide {row.name}", f"unknown class index {class_idx}")
        what = "delete" if delete else ("reshape" if geometry is not None else "change class of")
        patch = self.patch(patch_id) if patch_id is not None else None
        with self.store.read() as s:
            old = s.scalar(select(AnnotationRow.wkb).where(AnnotationRow.id == annotation_id))
        version = self.labels.replace(row.id, annotation_id, 0 if delete else class_idx,
                                      None if delete else geometry, author=author,
                                      message=f"{what} annotation {annotation_id}", patch=patch)
        if old is not None:  # the patches under the polygon before and after the edit
            import shapely

            before = shapely.from_wkb(old)
            region = before if geometry is None else before.union(geometry)
            self.rescore(row.id, region, patch_id, since=version - 1)
        return version

    def revert_patch(self, patch_id: int, to_version: int, *, author: str = "script",
                     region: BaseGeometry | None = None) -> int:
        """Make a patch (or ``region``) look as it did at label version ``to_version``, as a new version."""
        from al_core.project.patches import patch_box

        patch = self.patch(patch_id)
        area = patch_box(patch) if region is None else region
        version = self.labels.revert(patch.slide_id, area, to_version, author=author, patch=patch)
        self.rescore(patch.slide_id, area, patch_id, since=version - 1)
        return version

    def mark_reviewed(self, patch_id: int, author: str, action: str = "reviewed") -> None:
        """Record that a reviewer looked at a patch and kept its labels."""
        patch = self.patch(patch_id)
        self.labels.mark_reviewed(patch, author, action)
        # a reviewed patch counts as labelled: an unlabelled one gets an IoU (its label did not change)
        self.rescore(patch.slide_id, None, patch_id, since=self.labels.version(patch.slide_id))

    def rescore(self, slide: SlideKey, region: BaseGeometry | None, patch_id: int | None = None,
                since: int | None = None) -> None:
        """Re-score the patches a saved edit of ``region`` touched (and the reviewed ``patch_id``) against the
        stored predictions (:func:`al_core.learn.rescore.rescore_region`). The edit is saved already, so a failure
        only leaves the old scores (logged), never an unsaved edit."""
        from al_core.learn.rescore import rescore_region

        try:
            rescore_region(self, self.slide_row(slide).id, region, patch_id, since)
        except (ProjectError, OSError, ValueError) as err:
            log.warning("warning: the edit is saved but its patches keep their old scores: %s", err)

    def labelled_patch_ids(self, slide: SlideKey | None = None) -> set[int]:
        """Patches that label geometry touches or a reviewer saw (unlabelled pixels of them are background)."""
        from al_core.project.patches import covered_by, touched_by

        patches = self.patches(slide)
        out: set[int] = set()
        for sid in sorted({p.slide_id for p in patches}):
            mine = [p for p in patches if p.slide_id == sid]
            out |= touched_by(mine, [a.geometry for a in self.labels.annotations(sid)])
            out |= covered_by(mine, [(x, y, s) for _, x, y, s in self.labels.reviewed_regions(sid)])
        return out

    def reviewed_patch_ids(self, slide: SlideKey | None = None) -> set[int]:
        """Patches of the current grid whose region a reviewer saved or marked reviewed."""
        from al_core.project.patches import covered_by

        patches = self.patches(slide)
        regions = self.labels.reviewed_regions(self.slide_row(slide).id if slide is not None else None)
        out: set[int] = set()
        for sid in sorted({p.slide_id for p in patches}):
            out |= covered_by([p for p in patches if p.slide_id == sid], [(x, y, s) for i, x, y, s in regions if i == sid])
        return out

    def status(self) -> dict[str, Any]:
        """Slides, patches, tissue and labelled/unlabelled counts, as plain data."""
        from al_core.project.status import project_status

        return project_status(self)

    # --- the loop -----------------------------------------------------------------------------------
    @property
    def predictions(self) -> PredictionStore:
        """Stored per-patch predictions of the project's models."""
        from al_core.learn.predictions import PredictionStore

        if self._predictions is None:
            self._predictions = PredictionStore(self.root)
        return self._predictions

    def train(self, options: TrainOptions | None = None, **kwargs: Any) -> TrainResult:
        """Train a model version on the labelled patches (``options`` or :class:`TrainOptions` fields, plus
        ``from_model``, ``encoder``, ``progress``, ``cancel``… as keywords; see :func:`al_core.learn.train.train`)."""
        from al_core.learn.train import TrainOptions, train

        fields = set(TrainOptions.__dataclass_fields__)
        opts = options or TrainOptions(**{k: v for k, v in kwargs.items() if k in fields})
        return train(self, opts, **{k: v for k, v in kwargs.items() if k not in fields})

    def predict(self, model: ModelRef = "active", **kwargs: Any) -> PredictResult:
        """Predict every patch of the grid and store probabilities and scores (:func:`al_core.learn.predict.predict`)."""
        from al_core.learn.predict import predict

        return predict(self, model, **kwargs)

    def review_queue(self, model: ModelRef = "active", **kwargs: Any) -> pd.DataFrame:
        """The patches to review next, worst IoU first (:func:`al_core.learn.rank.review_queue`)."""
        from al_core.learn.rank import review_queue

        return review_queue(self, model, **kwargs)

    def metrics(self, model: ModelRef = "active", **kwargs: Any) -> dict[str, Any]:
        """The paper's metric set of a model version (:func:`al_core.learn.evaluate.stored_metrics`)."""
        from al_core.learn.evaluate import stored_metrics

        return stored_metrics(self, model, **kwargs)

    def export(self, out: str | os.PathLike[str], model: ModelRef = "active", *, push: str | None = None,
               overwrite: bool = False, overlap: int | None = None, mpp: float | None = None,
               downsample: float | None = None) -> ExportResult:
        """Export a model version to ONNX (settings in its metadata); ``push`` also deploys it under that name;
        ``mpp``/``downsample``: the training scale of a model that has none recorded."""
        from al_core.deploy.project_export import export_project_model

        return export_project_model(self, model, out, push=push, overwrite=overwrite, overlap=overlap, mpp=mpp,
                                    downsample=downsample)

    def deployed(self) -> list[DeployedModel]:
        """The project's deployed (pushed) models, newest first."""
        from al_core.deploy.registry import list_deployed

        return list_deployed(self.root)


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{(path / DB_NAME).resolve()}"
