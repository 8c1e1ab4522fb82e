"""Constants shared by training, deployment, the CLI and the apps (no imports: safe anywhere, and cheap)."""

from __future__ import annotations

#: the value masks carry for pixels no loss or metric counts (ignore classes, unknown class indices)
IGNORE_INDEX = 255
#: the ImageNet statistics most pretrained encoders expect (0-1 scale)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: environment variable naming the project the app (server extension and kernels) opens
PROJECT_ENV = "SLIDELOOP_PROJECT"
#: environment variable naming a shared Dask scheduler (``tcp://host:8786``) or a scheduler file
SCHEDULER_ENV = "SLIDELOOP_SCHEDULER"
#: the worker resource every job needs; declare it once per GPU (``dask worker --resources GPU=1``)
RESOURCE = "GPU"
