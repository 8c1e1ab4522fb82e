"""Small models for the export/inference tests: a tiny randomly initialised smp Unet, and a fixed
'darkness' convolution whose correct output is known, so stitching can be compared with a direct
full-image prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from al_core._torch_compat import ensure_torchvision_importable
from al_core.model_config import IMAGENET_MEAN, IMAGENET_STD

SHELL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "lavlab-shell-v1"
SHELL_MODEL = SHELL_DIR / "model_v1.onnx"
TINY_ENCODER = "tu-mobilenetv3_small_050"


def tiny_unet(classes: int = 2, seed: int = 0) -> torch.nn.Module:
    ensure_torchvision_importable()
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    return smp.Unet(TINY_ENCODER, encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8),
                    classes=classes).eval()


def unet_metadata(**kw: object) -> dict:
    meta = {"input_size": 128, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "classes": [{"index": 0, "name": "Background", "color": "#000000"},
                        {"index": 1, "name": "Tumour", "color": "#c80000"}],
            "target_mpp": 2.0, "overlap": 16, "model_version": "7", "metrics": {"iou": 0.61, "dice": 0.72}}
    meta.update(kw)
    return meta


class Darkness(torch.nn.Module):
    """Two logits: channel 1 wins where the 5x5 mean intensity (0–1 input) is below 0.78 (tissue)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 5, padding=2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1] = -20.0 / 75.0  # -20 x mean over 3 channels x 25 px
            self.conv.bias.copy_(torch.tensor([0.0, 20.0 * 0.78]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def darkness_metadata(**kw: object) -> dict:
    meta = {"input_size": 128, "mean": [0.0], "std": [1.0], "scale": 1 / 255,
            "classes": ["Background", "Tissue"], "target_mpp": 2.0, "overlap": 16, "model_version": "dark-1"}
    meta.update(kw)
    return meta


def darkness_reference(rgb: np.ndarray) -> np.ndarray:
    """Softmax probabilities (2, H, W) of :class:`Darkness` on a whole RGB image, straight from torch."""
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        return torch.softmax(Darkness()(x), dim=1)[0].numpy()
