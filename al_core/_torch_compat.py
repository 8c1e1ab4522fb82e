"""Make ``import torchvision`` (and so timm and segmentation-models-pytorch) work beside a CPU-only torch.

The torchvision wheel on PyPI is built against CUDA torch; with PyTorch's CPU build its compiled ``_C``
extension cannot load. torchvision tolerates that for its detection ops, except that its
``_meta_registrations`` registers fake kernels for ``torchvision::nms``/``qnms`` unconditionally, which
raises "operator torchvision::nms does not exist" and aborts the import. slideloop only needs
torchvision's pure-Python model code (encoders), so when — and only when — the extension cannot load, we
declare those operator schemas without kernels before torchvision is imported. Calling them would raise
"no kernel", which is honest: detection ops are unavailable in that environment. With a working
torchvision (CUDA torch, PyTorch's own CPU wheels) this does nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_patched: list[str] = []


def patched_ops() -> list[str]:
    """The torchvision operators declared by :func:`ensure_torchvision_importable` (empty if none)."""
    return list(_patched)


def ensure_torchvision_importable() -> bool:
    """Declare torchvision's unconditionally-faked ops if its extension cannot load. True if it did."""
    if "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    pkg = Path(spec.origin).parent
    libs = sorted(pkg.glob("_C.*so")) + sorted(pkg.glob("_C*.pyd"))
    if not libs:
        return False
    import torch

    try:
        torch.ops.load_library(str(libs[0]))  # type: ignore[no-untyped-call]
        return False
    except (OSError, RuntimeError) as err:
        log.info("torchvision extension unavailable (%s); declaring its fake-registered ops", err)
    meta = pkg / "_meta_registrations.py"
    names = re.findall(r'register_fake\(\s*"torchvision::(\w+)"', meta.read_text()) if meta.exists() else []
    for name in names or ["nms"]:
        try:
            torch.library.define(f"torchvision::{name}", _NMS_SCHEMA)
            _patched.append(name)
        except RuntimeError:  # already declared (a second call, or a partial extension load)
            pass
    return bool(_patched)
