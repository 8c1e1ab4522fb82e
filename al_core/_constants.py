"""Constants shared by training and deployment (no imports: safe anywhere)."""

from __future__ import annotations

#: the value masks carry for pixels no loss or metric counts (ignore classes, unknown class indices)
IGNORE_INDEX = 255
#: the ImageNet statistics most pretrained encoders expect (0-1 scale)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
