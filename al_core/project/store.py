"""A connection to a project database: engine set-up, schema version check and migrations, transactions."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Engine, create_engine, event, insert, inspect, make_url, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DatabaseError as SADatabaseError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from al_core.errors import DatabaseError, ProjectError, SchemaError
from al_core.project import integrity
from al_core.project.schema import Base, Meta, utcnow

#: schema of the tables in :mod:`al_core.project.schema`; bump it with a migration in :data:`MIGRATIONS`
SCHEMA_VERSION = 4
APP_ID = "slideloop"

#: a migration from schema N to N+1, run inside the upgrade transaction
Migration = Callable[[Connection], None]


def _v1_to_v2(conn: Connection) -> None:
    """Jobs link the model they made; reviews carry their slide region (so they survive a rebuilt grid)."""
    conn.execute(text("ALTER TABLE jobs ADD COLUMN model_id INTEGER REFERENCES models(id)"))
    for col in ("slide_id", "x", "y", "size"):
        conn.execute(text(f"ALTER TABLE reviews ADD COLUMN {col} INTEGER"))
    conn.execute(text(
        "UPDATE reviews SET slide_id = (SELECT slide_id FROM patches WHERE patches.id = reviews.patch_id), "
        "x = (SELECT x FROM patches WHERE patches.id = reviews.patch_id), "
        "y = (SELECT y FROM patches WHERE patches.id = reviews.patch_id), "
        "size = (SELECT size FROM patches WHERE patches.id = reviews.patch_id)"))


def _v2_to_v3(conn: Connection) -> None:
    """Patch scores gain the MC-dropout uncertainty; slides gain tags."""
    conn.execute(text("ALTER TABLE patch_scores ADD COLUMN mcdropout FLOAT"))
    conn.execute(text("ALTER TABLE slides ADD COLUMN tags TEXT"))


def _v3_to_v4(conn: Connection) -> None:
    """Jobs and model rows record the process running them, so a dead one is noticed."""
    for table in ("jobs", "models"):
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN pid INTEGER"))
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN host VARCHAR(255)"))


MIGRATIONS: dict[int, Migration] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}

_IMMEDIATE = {"slideloop_immediate": True}


class Store:
    """Connection to a project database; every write goes through :meth:`write` (one transaction)."""

    def __init__(self, url: str, *, create: bool = False, migrations: dict[int, Migration] | None = None) -> None:
        self.url = url
        #: the SQLite file, or ``None`` for a server database
        self.file = integrity.sqlite_file(url)
        #: what error messages name: the file, or the URL without its password
        self.source = str(self.file) if self.file else make_url(url).render_as_string(hide_password=True)
        if self.file is not None and not create:
            integrity.precheck(self.file)  # before connecting: a connection would write to an empty file
        self.engine = _make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            self._create()
            return
        with self._named_errors():
            if self.file is not None and self.file.stat().st_size <= integrity.QUICK_CHECK_BYTES:
                self.check(full=False)
            self._check_schema(MIGRATIONS if migrations is None else migrations)

    def check(self, *, full: bool = True) -> None:
        """Check the SQLite database's pages (``integrity_check``; ``quick_check`` if not ``full``); a damaged
        one raises :class:`~al_core.errors.DatabaseError` saying how to recover. Server databases pass."""
        if self.file is None:
            return
        raw = self.engine.raw_connection()
        try:
            integrity.check(raw.driver_connection, self.file, full=full)  # type: ignore[arg-type]
        finally:
            raw.close()

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql`` (or another SQLAlchemy dialect name)."""
        return self.engine.dialect.name

    def _create(self) -> None:
        with self.engine.begin() as conn:
            Base.metadata.create_all(conn)
            conn.execute(insert(Meta), [
                {"key": "app", "value": APP_ID},
                {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                {"key": "created_at", "value": utcnow()},
            ])

    def _check_schema(self, migrations: dict[int, Migration]) -> None:
        try:
            tables = set(inspect(self.engine).get_table_names())
        except SADatabaseError as err:
            raise DatabaseError(self.source, f"not a readable database ({err.orig})") from err
        if "meta" not in tables:
            raise ProjectError(f"{self.source}: not a slideloop project database (no meta table)")
        with self.engine.connect() as conn:
            meta = dict(conn.execute(select(Meta.key, Meta.value)).all())
        if meta.get("app") != APP_ID:
            raise ProjectError(f"{self.source}: not a slideloop project database")
        try:
            version = int(meta.get("schema_version", "0"))
        except ValueError:
            raise SchemaError(f"{self.source}: the schema version {meta.get('schema_version')!r} is not a number; "
                              "the database was changed by something other than slideloop"
                              + (f"; {integrity.recovery(self.file)}" if self.file else "")) from None
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"{self.source}: project schema {version} is newer than this slideloop supports ({SCHEMA_VERSION});"
                " upgrade slideloop to open it"
            )
        if version < SCHEMA_VERSION:
            self._migrate(version, migrations)

    def _migrate(self, version: int, migrations: dict[int, Migration]) -> None:
        with self.engine.connect().execution_options(**_IMMEDIATE) as conn, conn.begin():
            # another process may have migrated while we looked: read the version again under the write lock
            current = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
            version = int(current or version)
            while version < SCHEMA_VERSION:
                if version not in migrations:
                    raise SchemaError(f"{self.source}: no migration from schema {version} to {version + 1}")
                migrations[version](conn)
                version += 1
            conn.execute(update(Meta).where(Meta.key == "schema_version").values(value=str(version)))

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading (no transaction is held open beyond the block)."""
        with self._named_errors(), self._sessions() as session:
            yield session

    @contextlib.contextmanager
    def _named_errors(self) -> Iterator[None]:
        """Database errors (damage, a full disk, a lock held too long) as one error naming the database;
        integrity errors stay as they are, for the caller to say which constraint a user broke."""
        try:
            yield
        except IntegrityError:
            raise
        except SADatabaseError as err:
            problem = str(err.orig) if err.orig is not None else str(err).splitlines()[0]
            hint = f"; {integrity.recovery(self.file)}" if self.file and "malformed" in problem else ""
            raise DatabaseError(self.source, f"database error: {problem}{hint}") from err

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose changes commit together at the end of the block, or not at all.

        On SQLite the transaction takes the write lock at once (``BEGIN IMMEDIATE``), so what it reads stays
        true until it commits; on PostgreSQL lock the rows you read-then-write (``with_for_update``).
        """
        with self._named_errors(), self._sessions() as session, session.begin():
            session.connection(execution_options=_IMMEDIATE)
            yield session

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """A value of the ``meta`` table."""
        with self.read() as s:
            row = s.get(Meta, key)
            return row.value if row else default

    def set_meta(self, session: Session, key: str, value: Any) -> None:
        """Set a ``meta`` value inside a write session (non-strings are stored as JSON)."""
        session.merge(Meta(key=key, value=value if isinstance(value, str) else json.dumps(value)))

    def dispose(self) -> None:
        """Close every pooled connection."""
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
