"""slideloop core: slides, tissue, the patch grid, the project store and labels, models, deployment.

The scripting surface is :class:`Project` (``Project.create``/``open``, then ``add_slide``, ``build_grid``,
``import_labels``, ``train``, ``predict``, ``review_queue``, ``correct``, ``export``) and :func:`infer` for
whole slides. Names are imported on first use, so ``import al_core`` is cheap. Nothing here imports widgets,
tornado or jupyter_server; the apps call this package, never the reverse.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "Project": "al_core.project.project",
    "ClassInfo": "al_core.project.classes",
    "GridSpec": "al_core.wsi.grid",
    "Slide": "al_core.wsi.slides",
    "open_slide": "al_core.wsi.slides",
    "TrainOptions": "al_core.learn.train",
    "TrainResult": "al_core.learn.train",
    "PredictResult": "al_core.learn.predict",
    "InferenceConfig": "al_core.deploy.config",
    "InferenceResult": "al_core.deploy.infer",
    "infer": "al_core.deploy.infer",
    "infer_many": "al_core.deploy.many",
    **{name: "al_core.errors" for name in (
        "SlideloopError", "SlideError", "ScaleError", "ProjectError", "NoGridError", "NoModelError", "SchemaError",
        "LabelError", "TrainingError", "CheckpointError", "ModelConfigError", "ExportError", "InferenceError")},
}

__all__ = [
    "CheckpointError",
    "ClassInfo",
    "ExportError",
    "GridSpec",
    "InferenceConfig",
    "InferenceError",
    "InferenceResult",
    "LabelError",
    "ModelConfigError",
    "NoGridError",
    "NoModelError",
    "PredictResult",
    "Project",
    "ProjectError",
    "ScaleError",
    "SchemaError",
    "Slide",
    "SlideError",
    "SlideloopError",
    "TrainOptions",
    "TrainResult",
    "TrainingError",
    "__version__",
    "infer",
    "infer_many",
    "open_slide",
]

if TYPE_CHECKING:
    from al_core.deploy.config import InferenceConfig
    from al_core.deploy.infer import InferenceResult, infer
    from al_core.deploy.many import infer_many
    from al_core.errors import (
        CheckpointError,
        ExportError,
        InferenceError,
        LabelError,
        ModelConfigError,
        NoGridError,
        NoModelError,
        ProjectError,
        ScaleError,
        SchemaError,
        SlideError,
        SlideloopError,
        TrainingError,
    )
    from al_core.learn.predict import PredictResult
    from al_core.learn.train import TrainOptions, TrainResult
    from al_core.project.classes import ClassInfo
    from al_core.project.project import Project
    from al_core.wsi.grid import GridSpec
    from al_core.wsi.slides import Slide, open_slide


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'al_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
