"""Slide files uploaded through the app: kept in ``<project>/uploads/`` and registered like any other slide."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from al_core._guards import check_free_space
from al_core._io import atomic_write_bytes
from al_core.errors import SlideError
from al_core.wsi.slides import IMAGE_SUFFIXES, TIFF_SUFFIXES

if TYPE_CHECKING:
    from al_core.project.project import Project
    from al_core.project.schema import SlideRow

UPLOADS_DIR = "uploads"
#: slide file types an upload may have (what :func:`al_core.wsi.slides.open_slide` opens)
SLIDE_SUFFIXES = TIFF_SUFFIXES + IMAGE_SUFFIXES


def safe_file_name(name: str) -> str:
    """``name`` reduced to letters, digits, ``.``, ``_`` and ``-`` (no folders, no leading dot)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).lstrip(".") or "slide"


def add_uploaded_slide(project: Project, name: str, content: bytes) -> SlideRow:
    """Save an uploaded slide file into the project's uploads folder (never over an existing file) and
    register it; a file that cannot be registered is removed again."""
    safe = safe_file_name(name)
    if Path(safe).suffix.lower() not in SLIDE_SUFFIXES:
        raise SlideError(name, f"not a slide file type slideloop opens ({', '.join(SLIDE_SUFFIXES)})")
    folder = project.root / UPLOADS_DIR
    folder.mkdir(exist_ok=True)
    dest = folder / safe
    n = 1
    while dest.exists():
        dest = folder / f"{Path(safe).stem}-{n}{Path(safe).suffix}"
        n += 1
    check_free_space(folder, len(content), f"the upload {safe}")
    atomic_write_bytes(dest, content)
    try:
        return project.add_slide(dest, name=dest.stem)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
