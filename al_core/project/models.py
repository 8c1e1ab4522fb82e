"""The project's model versions: which row a reference names and where its checkpoint lives."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from al_core.errors import NoModelError, ProjectError
from al_core.project.schema import ModelRow
from al_core.project.store import Store

#: model reference: ``"latest"`` (or ``None``), or a model id (``int`` or digits)
ModelRef = int | str | None
MODELS_DIR = "models"


class ModelVersions:
    """Model rows of one project and their files under ``<project>/models/<id>/``."""

    def __init__(self, store: Store, root: Path) -> None:
        self.store = store
        self.root = root

    def list(self) -> list[ModelRow]:
        """Every model version, oldest first (any status)."""
        with self.store.read() as s:
            return list(s.scalars(select(ModelRow).order_by(ModelRow.id)).all())

    def get(self, model_id: int) -> ModelRow | None:
        """The row of ``model_id`` (any status), or ``None``."""
        with self.store.read() as s:
            return s.get(ModelRow, model_id)

    def resolve(self, ref: ModelRef = "latest") -> ModelRow:
        """A finished model version: ``"latest"``/``None`` (newest finished) or its id."""
        if ref is None or (isinstance(ref, str) and ref.lower() == "latest"):
            with self.store.read() as s:
                row = s.scalar(select(ModelRow).where(ModelRow.status == "done").order_by(ModelRow.id.desc()))
            if row is None:
                raise NoModelError(f"{self.root}: no trained model yet")
            return row
        try:
            mid = int(ref)
        except ValueError as err:
            raise ValueError(f"model {ref!r}: expected 'latest' or a model id") from err
        row = self.get(mid)
        if row is None:
            raise ProjectError(f"{self.root}: no model {mid}")
        if row.checkpoint is None:
            raise ProjectError(f"model {mid} has no checkpoint (status {row.status}: it never finished an epoch)")
        return row

    def checkpoint(self, row: ModelRow) -> Path:
        """The checkpoint file of a model row (stored relative to the project folder)."""
        if row.checkpoint is None:
            raise ProjectError(f"model {row.id} has no checkpoint (status {row.status})")
        p = Path(row.checkpoint)
        return p if p.is_absolute() else self.root / p

    def folder(self, model_id: int) -> Path:
        """Where model ``model_id``'s files go."""
        return self.root / MODELS_DIR / str(model_id)
