"""Where and at which precision to run a model: CUDA or CPU, and autocast only where it is native."""

from __future__ import annotations

import os
import sys

import torch

from al_core.errors import TrainingError


def cpu_has_native_bf16() -> bool:
    """True if this CPU computes bf16 natively (x86 AVX512_BF16 or AMX-BF16, Arm BF16).

    ``SLIDELOOP_CPU_BF16=0/1`` overrides. Without native support bf16 is emulated and slower than fp32.
    """
    env = os.environ.get("SLIDELOOP_CPU_BF16")
    if env in ("0", "1"):
        return env == "1"
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith(("flags", "Features")):
                        flags = set(line.split(":", 1)[1].split())
                        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        except OSError:
            return False
    if sys.platform == "darwin":
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5, check=False).stdout.strip()
            return out == "1"
        except (OSError, subprocess.SubprocessError):
            return False
    return False


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; an explicit CUDA request without CUDA is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {requested!r} requested but CUDA is not available here (use the CPU)")
    return dev


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device`` (``None`` = fp32). ``auto`` uses bf16 only where it is native."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if precision == "fp16":
        raise TrainingError("fp16 autocast is for CUDA; on a CPU use bf16 or fp32")
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def precision_name(amp: torch.dtype | None) -> str:
    """The name a report gives an autocast dtype: ``fp32`` (none), ``bf16`` or ``fp16``."""
    if amp is None:
        return "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, str(amp).replace("torch.", ""))
