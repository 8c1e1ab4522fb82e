"""Label classes: a name, a colour and a pixel value (0 is always Background)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """A ``#RRGGBB`` colour (the ``#`` optional) as 0–255 RGB; ``ValueError`` for anything else."""
    c = color.lstrip("#")
    if not re.fullmatch(r"[0-9a-fA-F]{6}", c):
        raise ValueError(f"not a #RRGGBB colour: {color!r}")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def rgb_to_hex(rgb: Sequence[int]) -> str:
    """The first three values (0–255) as a lower-case ``#rrggbb`` colour."""
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb[:3]))


BACKGROUND = "Background"


DEFAULT_CLASSES = ("Epithelium:#c80000",)


@dataclass(frozen=True)
class ClassInfo:
    """A label class; ``idx`` is its pixel value in masks. Pixels of an ``ignore`` class count in no loss or metric."""

    idx: int
    name: str
    color: str
    ignore: bool = False

    @classmethod
    def parse(cls, spec: str, idx: int) -> ClassInfo:
        """Parse ``NAME:#RRGGBB`` or ``NAME:#RRGGBB:ignore``."""
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[0].strip() or (len(parts) == 3 and parts[2] != "ignore"):
            raise ValueError(f"class spec {spec!r}: expected NAME:#RRGGBB or NAME:#RRGGBB:ignore")
        hex_to_rgb(parts[1])
        return cls(idx, parts[0].strip(), parts[1].lower(), len(parts) == 3)
