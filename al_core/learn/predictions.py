"""Reading stored predictions back: per-patch class probabilities and argmax maps for overlays.

Layout, per model, under ``<project>/predictions/<model id>/``: ``probs.npy`` (float16 ``(N, C, h, w)``, a
memmap) and ``index.json`` (the patch ids of its rows, the reduction factor, the class indices of the channels).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from al_core.errors import ProjectError

PREDICTIONS_DIR = "predictions"


def predictions_dir(project_root: Path, model_id: int) -> Path:
    """The folder holding model ``model_id``'s stored predictions."""
    return project_root / PREDICTIONS_DIR / str(model_id)


class PredictionStore:
    """Stored predictions of a project's models; the parsed indexes are kept (and re-read when rewritten)."""

    def __init__(self, project_root: str | os.PathLike[str]) -> None:
        self.root = Path(project_root)
        self._indexes: dict[int, tuple[tuple[int, int], dict[str, Any], dict[int, int]]] = {}
        self._lock = threading.Lock()

    def index(self, model_id: int) -> tuple[dict[str, Any], dict[int, int]]:
        """Model ``model_id``'s index and its patch id → row map."""
        d = predictions_dir(self.root, model_id)
        f = d / "index.json"
        try:
            st = f.stat()
        except FileNotFoundError as err:
            raise ProjectError(f"{d}: no predictions of model {model_id}") from err
        stamp = (st.st_mtime_ns, st.st_ino)  # a rewrite is a rename: a new inode even within one mtime tick
        with self._lock:
            hit = self._indexes.get(model_id)
        if hit is None or hit[0] != stamp:
            try:
                index = json.loads(f.read_text())
                rows = {int(p): i for i, p in enumerate(index["patch_ids"])}
            except (ValueError, KeyError, TypeError) as err:
                raise ProjectError(f"{f}: unreadable prediction index ({err})") from err
            hit = (stamp, index, rows)
            with self._lock:
                self._indexes[model_id] = hit
        return hit[1], hit[2]

    def probabilities(self, model_id: int, patch_id: int) -> npt.NDArray[np.float32]:
        """Class probabilities ``(C, h, w)`` of one patch, channels in model order."""
        index, rows = self.index(model_id)
        if patch_id not in rows:
            raise ProjectError(f"patch {patch_id} has no prediction from model {model_id} "
                               f"(it predicted grid {index.get('grid_id')}; predict again after a new grid)")
        probs = np.load(predictions_dir(self.root, model_id) / "probs.npy", mmap_mode="r")
        return np.asarray(probs[rows[patch_id]], dtype=np.float32)

    def classes(self, model_id: int, patch_id: int) -> npt.NDArray[np.uint8]:
        """The argmax map ``(h, w)`` of one patch's stored prediction, in project class indices."""
        index, _ = self.index(model_id)
        lut = np.asarray(index["class_idx"], dtype=np.uint8)
        return np.asarray(lut[self.probabilities(model_id, patch_id).argmax(0)], dtype=np.uint8)


def load_prediction(project_root: str | os.PathLike[str], model_id: int, patch_id: int) -> npt.NDArray[np.float32]:
    """Class probabilities ``(C, h, w)`` float32 of one stored patch prediction (model channel order)."""
    return PredictionStore(project_root).probabilities(model_id, patch_id)


def prediction_classes(project_root: str | os.PathLike[str], model_id: int, patch_id: int) -> npt.NDArray[np.uint8]:
    """The argmax map ``(h, w)`` of a stored prediction, in project class indices."""
    return PredictionStore(project_root).classes(model_id, patch_id)
