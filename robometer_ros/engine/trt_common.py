"""What the TensorRT engine builder and the TensorRT runtime share: which TensorRT, which GPU, which key.

Two products speak the same Python API here: NVIDIA TensorRT (``import tensorrt``; Jetson/datacenter/
desktop GPUs; needs a GPU to build) and TensorRT-RTX (``import tensorrt_rtx``; RTX GPUs; builds
ahead-of-time on a CPU-only machine, which is how CI proves the ONNX parts parse and build).

Does not import torch at import time; ``gpu_identity`` only falls back to torch when nvidia-smi is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from types import ModuleType

from robometer_ros.engine.bundle import EngineKey
from robometer_ros.engine.runtime import RuntimeUnavailableError

#: gpu_name recorded for TensorRT-RTX plans built ahead of time without a GPU
CPU_AOT_GPU = "cpu-aot"


def import_tensorrt(prefer: str | None = None) -> tuple[ModuleType, str]:
    """Import TensorRT (``tensorrt``) or else TensorRT-RTX (``tensorrt_rtx``); return (module, flavor).

    ``prefer`` ("tensorrt" / "tensorrt_rtx") forces one of them.
    """
    order = [prefer] if prefer else ["tensorrt", "tensorrt_rtx"]
    errors = []
    for name in order:
        try:
            module = __import__(name)
        except ImportError as exc:  # the bindings can be present without their shared libraries
            errors.append(f"{name}: {exc}")
            continue
        if not hasattr(module, "Builder") and not hasattr(module, "Runtime"):
            errors.append(f"{name}: incomplete install (no Builder/Runtime)")
            continue
        return module, name
    raise RuntimeUnavailableError("TensorRT is not importable here (" + "; ".join(errors) + ")")


@dataclass(frozen=True)
class GpuIdentity:
    """The GPU a plan is built for: its marketing name and compute capability ("8.9")."""

    name: str
    compute_capability: str

    @property
    def sm(self) -> int:
        """Compute capability as an integer, e.g. 89."""
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)


def gpu_identity(device_index: int = 0) -> GpuIdentity | None:
    """Name and compute capability of CUDA device ``device_index``, or None without a usable GPU."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader", f"--id={device_index}"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout.strip()
            name, cap = (s.strip() for s in out.splitlines()[0].rsplit(",", 1))
            if re.fullmatch(r"\d+\.\d+", cap):
                return GpuIdentity(name, cap)
        except (subprocess.SubprocessError, OSError, ValueError, IndexError):
            pass
    try:
        import torch

        if torch.cuda.is_available() and device_index < torch.cuda.device_count():
            major, minor = torch.cuda.get_device_capability(device_index)
            return GpuIdentity(torch.cuda.get_device_name(device_index), f"{major}.{minor}")
    except ImportError:
        pass
    return None


def engine_key(flavor: str, version: str, gpu: GpuIdentity | None, precision: str) -> EngineKey:
    """The index key of a plan built by ``flavor`` ``version`` for ``gpu`` (None: TensorRT-RTX AOT)."""
    if gpu is None:
        return EngineKey(flavor, version, CPU_AOT_GPU, "aot", precision)
    return EngineKey(flavor, version, gpu.name, gpu.compute_capability, precision)


def slug(text: str) -> str:
    """A file-name-safe form of a GPU name or version."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()
