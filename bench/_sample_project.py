"""Shared setup of the benchmarks: a throw-away project on the bundled sample."""

from __future__ import annotations

import tempfile
from pathlib import Path

from al_core.project.project import Project
from al_core.wsi.grid import GridSpec

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SVS = ROOT / "data" / "sample" / "CMU-1-Small-Region.svs"
SAMPLE_GEOJSON = ROOT / "data" / "sample" / "CMU-1-Small-Region.preannotation.geojson"


def sample_project(patch: int, downsample: float = 1.0) -> Project:
    """The sample slide with its pre-annotation, cut into ``patch`` px patches (no overlap), in a temp dir."""
    root = Path(tempfile.mkdtemp(prefix="slideloop-bench-")) / "proj"
    proj = Project.create(root, ["Epithelium:#c80000"])
    proj.add_slide(SAMPLE_SVS)
    proj.build_grid(GridSpec(patch=patch, overlap=0, downsample=downsample, min_tissue=0.1))
    proj.import_labels(SAMPLE_GEOJSON)
    return proj


def table(rows: list[dict[str, object]]) -> str:
    cols = list(rows[0])
    cells = [[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
