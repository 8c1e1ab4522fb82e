"""slideloop core: slides, tissue, patch grid, project store, labels and models.

Nothing here imports widgets, tornado or jupyter_server; the apps call this package, never the reverse.
"""

from __future__ import annotations

__version__ = "0.1.0"

from al_core.errors import (
    LabelError,
    ProjectError,
    SchemaError,
    SlideError,
    SlideloopError,
)
from al_core.grid import GridSpec
from al_core.project import Project
from al_core.slides import Slide, open_slide

__all__ = [
    "GridSpec",
    "LabelError",
    "Project",
    "ProjectError",
    "SchemaError",
    "Slide",
    "SlideError",
    "SlideloopError",
    "__version__",
    "open_slide",
]
