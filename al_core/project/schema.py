"""The project database's tables (SQLAlchemy ORM), the same on SQLite and PostgreSQL.

Label geometry is append-only: a correction creates a new label version of its slide that retires some
annotations and adds others, so every earlier state can be rebuilt and nothing is overwritten.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    inspect,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> str:
    """Now, UTC, ISO 8601 to the second (the format of every timestamp column)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Base(DeclarativeBase):
    """The declarative base of every table."""


class Meta(Base):
    """Key-value facts about the store itself (app, schema version, creation time)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ClassRow(Base):
    """A label class: index is the pixel value in masks (0 is always background)."""

    __tablename__ = "classes"
    id: Mapped[int] = mapped_column(primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, unique=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    color: Mapped[str] = mapped_column(String(16))
    ignore: Mapped[bool] = mapped_column(Boolean, default=False)


class SlideRow(Base):
    """A registered slide: its file, level-0 size in pixels, µm/px (``mpp_from_user``: given, not read from the
    file) and tissue mask (a PNG at ``tissue_downsample``)."""

    __tablename__ = "slides"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    path: Mapped[str] = mapped_column(Text)
    mpp: Mapped[float | None] = mapped_column(Float, nullable=True)
    mpp_from_user: Mapped[bool] = mapped_column(Boolean, default=False)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    levels: Mapped[int] = mapped_column(Integer)
    objective_power: Mapped[float | None] = mapped_column(Float, nullable=True)
    vendor: Mapped[str] = mapped_column(String(64), default="generic")
    added_at: Mapped[str] = mapped_column(String(32), default=utcnow)
    tissue_png: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    tissue_downsample: Mapped[float | None] = mapped_column(Float, nullable=True)
    tissue_fraction: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: free-form slide tags (stain, diagnosis, scanner…) as a JSON object of strings
    tags: Mapped[str | None] = mapped_column(Text, nullable=True)


class GridRow(Base):
    """One patch grid build; the newest one is the project's grid."""

    __tablename__ = "grids"
    id: Mapped[int] = mapped_column(primary_key=True)
    spec: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(32), default=utcnow)


class PatchRow(Base):
    """A patch: a level-0 square (x, y, size) read at the grid's downsample to ``patch`` pixels."""

    __tablename__ = "patches"
    id: Mapped[int] = mapped_column(primary_key=True)
    grid_id: Mapped[int] = mapped_column(ForeignKey("grids.id", ondelete="CASCADE"))
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"))
    col: Mapped[int] = mapped_column(Integer)
    row: Mapped[int] = mapped_column(Integer)
    x: Mapped[int] = mapped_column(Integer)
    y: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    patch: Mapped[int] = mapped_column(Integer)
    downsample: Mapped[float] = mapped_column(Float)
    tissue: Mapped[float] = mapped_column(Float)
    __table_args__ = (Index("ix_patches_grid_slide", "grid_id", "slide_id"),)


class LabelVersionRow(Base):
    """A version of one slide's labels (an import, a correction, an accepted prediction)."""

    __tablename__ = "label_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    author: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[str] = mapped_column(String(32), default=utcnow)
    source: Mapped[str] = mapped_column(Text, default="")
    message: Mapped[str] = mapped_column(Text, default="")
    __table_args__ = (UniqueConstraint("slide_id", "version"),)


class AnnotationRow(Base):
    """One polygon of one class, alive from ``created_version`` until ``retired_version`` (exclusive)."""

    __tablename__ = "annotations"
    id: Mapped[int] = mapped_column(primary_key=True)
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"))
    class_idx: Mapped[int] = mapped_column(Integer)
    wkb: Mapped[bytes] = mapped_column(LargeBinary)
    minx: Mapped[float] = mapped_column(Float)
    miny: Mapped[float] = mapped_column(Float)
    maxx: Mapped[float] = mapped_column(Float)
    maxy: Mapped[float] = mapped_column(Float)
    author: Mapped[str] = mapped_column(String(128))
    created_version: Mapped[int] = mapped_column(Integer)
    retired_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    __table_args__ = (Index("ix_annotations_slide_alive", "slide_id", "retired_version"),)


class ReviewRow(Base):
    """A reviewer's decision on a slide region (the patch reviewed): the region then counts as labelled even if
    it holds only background. Keyed by the region, not only the patch, so it survives a rebuilt grid."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(primary_key=True)
    patch_id: Mapped[int | None] = mapped_column(ForeignKey("patches.id", ondelete="SET NULL"), nullable=True,
                                                 index=True)
    slide_id: Mapped[int | None] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"), nullable=True)
    #: the reviewed level-0 square (the patch's x, y and side)
    x: Mapped[int | None] = mapped_column(Integer, nullable=True)
    y: Mapped[int | None] = mapped_column(Integer, nullable=True)
    size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    label_version: Mapped[int] = mapped_column(Integer)
    author: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[str] = mapped_column(String(32), default=utcnow)


class ModelRow(Base):
    """A trained model version: its checkpoint file, parent, settings and metrics."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(32), default="training")
    created_at: Mapped[str] = mapped_column(String(32), default=utcnow)
    finished_at: Mapped[str | None] = mapped_column(String(32), nullable=True)
    checkpoint: Mapped[str | None] = mapped_column(Text, nullable=True)
    config: Mapped[str] = mapped_column(Text, default="{}")
    metrics: Mapped[str] = mapped_column(Text, default="{}")
    history: Mapped[str] = mapped_column(Text, default="[]")
    label_versions: Mapped[str] = mapped_column(Text, default="{}")
    #: training settings (epochs, lr, batch, device, precision...) as JSON
    hparams: Mapped[str] = mapped_column(Text, default="{}")
    #: the training set as JSON: {"train": [patch ids], "val": [patch ids]}
    patches: Mapped[str] = mapped_column(Text, default="{}")
    wall_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: the process training it (pid on ``host``), so a run whose process died is marked failed
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)


class PatchScoreRow(Base):
    """Per patch and model: agreement with the current label and uncertainty, so ranking is a query."""

    __tablename__ = "patch_scores"
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    patch_id: Mapped[int] = mapped_column(ForeignKey("patches.id", ondelete="CASCADE"), primary_key=True)
    labelled: Mapped[bool] = mapped_column(Boolean, default=False)
    iou: Mapped[float | None] = mapped_column(Float, nullable=True)
    dice: Mapped[float | None] = mapped_column(Float, nullable=True)
    entropy: Mapped[float | None] = mapped_column(Float, nullable=True)
    disagreement: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: MC-dropout mutual information (predicted with ``mc_samples``)
    mcdropout: Mapped[float | None] = mapped_column(Float, nullable=True)
    label_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prediction: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: label-vs-prediction pixel confusion (JSON C×C, model channels) for labelled patches, so metrics are a query
    confusion: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: fraction of the patch's pixels predicted as each non-background channel (JSON list)
    fractions: Mapped[str | None] = mapped_column(Text, nullable=True)


class JobRow(Base):
    """A compute job (train, predict, grid) queued on the Dask cluster; the worker writes its progress here."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    params: Mapped[str] = mapped_column(Text, default="{}")
    status: Mapped[str] = mapped_column(String(16), default="queued")
    dask_key: Mapped[str] = mapped_column(String(128))
    author: Mapped[str] = mapped_column(String(128), default="")
    submitted: Mapped[float] = mapped_column(Float)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress: Mapped[str] = mapped_column(Text, default="{}")
    result: Mapped[str] = mapped_column(Text, default="{}")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    #: the model version a train job made (set by the job as soon as the model row exists)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), nullable=True)
    #: the worker process running it (pid on ``host``), so a job whose process died is marked failed
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)


def row_dict(row: Any) -> dict[str, Any]:
    """A mapped row's columns as a plain dict."""
    return {c.key: getattr(row, c.key) for c in inspect(row).mapper.column_attrs}
