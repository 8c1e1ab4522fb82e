"""Small models for the export/inference tests: a tiny randomly initialised smp Unet, and a fixed
'darkness' convolution whose correct output is known, so stitching can be compared with a direct
full-image prediction; and the check of an inference run's stage timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from al_core._constants import IMAGENET_MEAN, IMAGENET_STD
from al_core._torch_compat import ensure_torchvision_importable

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


#: timings are rounded to 0.1 ms each; sums of rounded stages may exceed the rounded total by that much
ROUNDING = 1e-3


def check_timings(t: dict[str, float], *, geojson: bool) -> None:
    """Every stage that did work took time, none longer than the run, and the stages that run one after the
    other in the same thread add up to no more than the run (concurrent ones may add up to more)."""
    from al_core.deploy.infer import STAGES

    assert set(t) == set(STAGES)
    busy = [s for s in STAGES if s != "total" and (geojson or s != "geojson")]
    for stage in busy:
        assert 0 < t[stage] <= t["total"] + ROUNDING, (stage, t)
    # the calling thread plans the patches, then runs ONNX Runtime (reading and stitching run beside it)
    assert t["patch_generation"] + t["inference"] <= t["total"] + ROUNDING, t
    # the stitcher thread converts outputs and blends; the final flush follows it
    assert t["output"] + t["stitching"] <= t["total"] + ROUNDING, t
    if not geojson:
        assert t["geojson"] == 0
