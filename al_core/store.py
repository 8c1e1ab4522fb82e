"""The project store: one SQLAlchemy schema for SQLite (default, one file per project) and PostgreSQL.

Label geometry is append-only: a correction creates a new label version of its slide that retires some
annotations and adds others, so every earlier state can be rebuilt and nothing is overwritten.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    Boolean,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from al_core.errors import ProjectError, SchemaError

#: schema of the tables below; bump it with a migration in :data:`MIGRATIONS`
SCHEMA_VERSION = 1
APP_ID = "slideloop"


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Base(DeclarativeBase):
    pass


class Meta(Base):
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
    """A reviewer's decision on a patch: it then counts as labelled even if it holds only background."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(primary_key=True)
    patch_id: Mapped[int] = mapped_column(ForeignKey("patches.id", ondelete="CASCADE"), index=True)
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


_IMMEDIATE = {"slideloop_immediate": True}

#: migrations from schema N to N+1, each run inside the upgrade transaction
Migration = Callable[[Connection], None]
MIGRATIONS: dict[int, Migration] = {}


class Store:
    """Connection to a project database; every write goes through :meth:`write` (one transaction)."""

    def __init__(self, url: str, *, create: bool = False, migrations: dict[int, Migration] | None = None) -> None:
        self.url = url
        self.engine = _make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            self._create()
        else:
            self._check_schema(MIGRATIONS if migrations is None else migrations)

    def _create(self) -> None:
        with self.engine.begin() as conn:
            Base.metadata.create_all(conn)
            conn.execute(Meta.__table__.insert(), [
                {"key": "app", "value": APP_ID},
                {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                {"key": "created_at", "value": utcnow()},
            ])

    def _check_schema(self, migrations: dict[int, Migration]) -> None:
        try:
            tables = set(inspect(self.engine).get_table_names())
        except DatabaseError as err:
            raise ProjectError(f"{self.url}: not a readable database ({err.orig})") from err
        if "meta" not in tables:
            raise ProjectError(f"{self.url}: not a slideloop project database (no meta table)")
        with self.engine.connect() as conn:
            meta = dict(conn.execute(select(Meta.key, Meta.value)).all())
        if meta.get("app") != APP_ID:
            raise ProjectError(f"{self.url}: not a slideloop project database")
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"{self.url}: project schema {version} is newer than this slideloop supports ({SCHEMA_VERSION});"
                " upgrade slideloop to open it"
            )
        if version < SCHEMA_VERSION:
            self._migrate(version, migrations)

    def _migrate(self, version: int, migrations: dict[int, Migration]) -> None:
        with self.engine.connect().execution_options(**_IMMEDIATE) as conn, conn.begin():
            while version < SCHEMA_VERSION:
                if version not in migrations:
                    raise SchemaError(f"{self.url}: no migration from schema {version} to {version + 1}")
                migrations[version](conn)
                version += 1
            conn.execute(Meta.__table__.update().where(Meta.key == "schema_version").values(value=str(version)))

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose changes commit together at the end of the block, or not at all."""
        with self._sessions() as session, session.begin():
            session.connection(execution_options=_IMMEDIATE)
            yield session

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self.read() as s:
            row = s.get(Meta, key)
            return row.value if row else default

    def set_meta(self, session: Session, key: str, value: Any) -> None:
        session.merge(Meta(key=key, value=value if isinstance(value, str) else json.dumps(value)))

    def dispose(self) -> None:
        self.engine.dispose()


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "isolation_level": None})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets readers (the tile server, the app) run while a writer commits; foreign keys for cascades
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # pysqlite would start transactions lazily; with isolation_level=None we issue BEGIN ourselves.
            # Writers take the lock up front: a deferred transaction that reads and then writes fails with
            # "database is locked" when two writers upgrade at once, an immediate one waits its turn.
            immediate = conn.get_execution_options().get("slideloop_immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True)


def row_dict(row: Any) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in inspect(row).mapper.column_attrs}


__all__ = [
    "SCHEMA_VERSION",
    "AnnotationRow",
    "ClassRow",
    "GridRow",
    "JobRow",
    "LabelVersionRow",
    "Meta",
    "ModelRow",
    "PatchRow",
    "PatchScoreRow",
    "ReviewRow",
    "SlideRow",
    "Store",
    "text",
]
