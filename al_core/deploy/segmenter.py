"""An ONNX Runtime session plus the config that says how to feed it and read its output."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from al_core.deploy.config import META_PREFIX, InferenceConfig, normalise
from al_core.deploy.onnx_io import check_against_model, load_config, read_onnx_metadata
from al_core.errors import InferenceError, ModelConfigError

#: execution providers in order of preference (the first available ones are used)
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def select_providers(requested: Sequence[str] | None = None) -> list[str]:
    """ONNX Runtime execution providers: ``requested`` (all must exist) or the best available ones."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ValueError(f"execution provider(s) {missing} not available; available: {available}")
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


class OnnxSegmenter:
    """An ONNX Runtime session plus the config that says how to feed it and read its output."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        config: InferenceConfig | str | os.PathLike[str] | None = None,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        p = Path(model_path)
        if p.is_dir() and (p / "model.onnx").is_file():  # a pushed model's folder
            p = p / "model.onnx"
        self.path = p
        props = read_onnx_metadata(p)  # clear error for a missing or non-ONNX file
        if isinstance(config, InferenceConfig):
            self.config = config
        elif config is not None:
            self.config = load_config(config)
        elif any(k.startswith(META_PREFIX) for k in props):
            self.config = InferenceConfig.from_metadata(props, p)
        else:
            raise ModelConfigError(p, "has no slideloop metadata; give its settings in a config file "
                                      "(JSON/TOML or a FastPathology model .txt)")
        if self.config.input_size[0] != self.config.input_size[1]:
            raise ModelConfigError(p, f"non-square model input {self.config.input_size} is not supported")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(p), sess_options=opts, providers=select_providers(providers))
        except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ModelConfigError(p, f"ONNX Runtime cannot load the model ({type(err).__name__}: {err})") from err
        self.input_name, self.output_name = check_against_model(
            self.config, self.session.get_inputs(), self.session.get_outputs(), p)
        self.providers = self.session.get_providers()

    def normalise(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(N, H, W, 3) float 0–255 → the model's input layout and value range."""
        return normalise(batch, self.config)

    def run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Raw model output for a normalised batch, as NCHW."""
        out = np.asarray(self.session.run([self.output_name], {self.input_name: x})[0], dtype=np.float32)
        if out.ndim != 4:
            raise InferenceError(f"{self.path}: output has shape {out.shape}, expected 4-D")
        return out if self.config.layout == "NCHW" else out.transpose(0, 3, 1, 2)

    def probabilities(self, raw: npt.NDArray[np.float32], size: tuple[int, int]) -> npt.NDArray[np.float32]:
        """Per-channel probabilities (N, C, h, w) at the input ``size`` (w, h) from a raw NCHW output."""
        act = self.config.activation
        prob: npt.NDArray[np.float32]
        if act == "softmax":
            e = np.exp(raw - raw.max(axis=1, keepdims=True))
            prob = e / e.sum(axis=1, keepdims=True)
        elif act == "sigmoid":
            prob = (1.0 / (1.0 + np.exp(-np.clip(raw, -60, 60)))).astype(np.float32)
        else:
            prob = raw
        w, h = size
        oh, ow = prob.shape[2:]
        if (oh, ow) == (h, w):
            return prob.astype(np.float32, copy=False)
        if oh >= h and ow >= w:  # padded output (e.g. to a multiple of 8): crop the padding
            return np.ascontiguousarray(prob[:, :, :h, :w], dtype=np.float32)
        # a coarser output map: back to input resolution
        return np.stack([np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in p])
                         for p in prob]).astype(np.float32)
