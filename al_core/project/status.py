"""A project's state at a glance, as plain data (the CLI's ``status`` and the apps' summaries)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from al_core.project.project import Project


def project_status(project: Project) -> dict[str, Any]:
    """Classes, grid, and per slide: size, scale, tissue, patches, labelled/unlabelled, label version."""
    spec = project.grid_spec()
    labelled = project.labelled_patch_ids()
    patches = project.patches()
    slides = []
    for r in project.slides():
        mine = [p for p in patches if p.slide_id == r.id]
        n_lab = sum(1 for p in mine if p.id in labelled)
        slides.append({
            "id": r.id, "name": r.name, "path": r.path, "width": r.width, "height": r.height,
            "levels": r.levels, "mpp": r.mpp, "calibrated": r.mpp is not None,
            "objective_power": r.objective_power, "vendor": r.vendor,
            "tissue_fraction": round(r.tissue_fraction or 0.0, 4),
            "patches": len(mine), "labelled": n_lab, "unlabelled": len(mine) - n_lab,
            "label_version": project.labels.version(r.id), "file_present": Path(r.path).exists(),
        })
    return {
        "project": str(project.root),
        "classes": [c.__dict__ for c in project.classes()],
        "grid": spec.to_dict() if spec else None,
        "slides": slides,
        "totals": {"slides": len(slides), "patches": len(patches), "labelled": len(labelled),
                   "unlabelled": len(patches) - len(labelled)},
    }
