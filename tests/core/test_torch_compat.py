"""segmentation-models-pytorch must import beside this machine's CPU torch and PyPI's CUDA torchvision."""

from __future__ import annotations

import subprocess
import sys


def test_smp_imports_in_a_fresh_interpreter():
    code = (
        "from al_core._torch_compat import ensure_torchvision_importable, patched_ops\n"
        "ensure_torchvision_importable()\n"
        "import segmentation_models_pytorch as smp, torch\n"
        "m = smp.Unet('resnet18', encoder_weights=None, classes=2)\n"
        "print(tuple(m(torch.zeros(1, 3, 64, 64)).shape), patched_ops())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("(1, 2, 64, 64)")


def test_does_nothing_once_torchvision_is_imported():
    code = (
        "from al_core._torch_compat import ensure_torchvision_importable\n"
        "ensure_torchvision_importable()\n"
        "import torchvision\n"
        "print(ensure_torchvision_importable())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_model_module_imports_smp():
    out = subprocess.run([sys.executable, "-c", "import al_core.learn.model, segmentation_models_pytorch"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
