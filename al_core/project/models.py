"""The project's model versions: which row a reference names and where its checkpoint lives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from al_core.errors import NoModelError, ProjectError
from al_core.project.schema import Meta, ModelRow, utcnow
from al_core.project.store import Store

#: model reference: ``"active"`` (or ``None``: the project's active model), ``"latest"`` (newest finished), or a
#: model id (``int`` or digits)
ModelRef = int | str | None
MODELS_DIR = "models"
#: ``meta`` key of the active model: JSON ``{"id", "by", "reason", "at", "chosen"}`` (``chosen``: a user's pick)
ACTIVE_KEY = "active_model"
#: ``meta`` key of every activation, oldest first (the same records)
ACTIVE_HISTORY_KEY = "active_history"


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

    def active_record(self) -> dict[str, Any] | None:
        """How the active model was chosen (``id``, ``by``, ``reason``, ``at``, ``chosen``), or ``None``."""
        text = self.store.get_meta(ACTIVE_KEY)
        return json.loads(text) if text else None

    def active(self) -> ModelRow | None:
        """The active model version: the one predict, rank, export and the review queue use by default."""
        rec = self.active_record()
        return self.get(int(rec["id"])) if rec else None

    def activate(self, model_id: int, *, by: str, reason: str, chosen: bool,
                 session: Session | None = None) -> None:
        """Make ``model_id`` (finished, with a checkpoint) the active model; ``chosen``: a user's decision,
        not the evidence of the validation set. Inside ``session`` when given (one transaction with the caller)."""
        row = self.get(model_id) if session is None else session.get(ModelRow, model_id)
        if row is None:
            raise ProjectError(f"{self.root}: no model {model_id}")
        if row.checkpoint is None or row.status not in ("done", "cancelled"):
            raise ProjectError(f"model {model_id} cannot be active (status {row.status}, "
                               f"{'no checkpoint' if row.checkpoint is None else 'unfinished'})")
        rec = {"id": model_id, "by": by, "reason": reason, "at": utcnow(), "chosen": chosen}
        if session is None:
            with self.store.write() as s:
                self._write_active(s, rec)
        else:
            self._write_active(session, rec)

    def _write_active(self, s: Session, rec: dict[str, Any]) -> None:
        hist = s.get(Meta, ACTIVE_HISTORY_KEY)
        self.store.set_meta(s, ACTIVE_HISTORY_KEY, (json.loads(hist.value) if hist else []) + [rec])
        self.store.set_meta(s, ACTIVE_KEY, rec)

    def resolve(self, ref: ModelRef = "active") -> ModelRow:
        """A finished model version: ``"active"``/``None`` (the active one; the newest finished in a project
        that has none yet), ``"latest"`` (newest finished) or its id."""
        if ref is None or (isinstance(ref, str) and ref.lower() == "active"):
            row = self.active()
            if row is not None:
                return row
            ref = "latest"
        if isinstance(ref, str) and ref.lower() == "latest":
            with self.store.read() as s:
                row = s.scalar(select(ModelRow).where(ModelRow.status == "done").order_by(ModelRow.id.desc()))
            if row is None:
                raise NoModelError(f"{self.root}: no trained model yet")
            return row
        try:
            mid = int(ref)
        except ValueError as err:
            raise ValueError(f"model {ref!r}: expected 'active', 'latest' or a model id") from err
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
