"""What the TensorRT engine builder and the TensorRT runtime share: which TensorRT, which GPU, which key.

Two products speak the same Python API here: NVIDIA TensorRT (``import tensorrt``; Jetson/datacenter/
desktop GPUs; needs a GPU to build) and TensorRT-RTX (``import tensorrt_rtx``; RTX GPUs; builds
ahead-of-time on a CPU-only machine, which is how CI proves the ONNX parts parse and build).

Never imports torch (``gpu_identity`` asks the CUDA driver directly).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from types import ModuleType

from robometer_ros.engine.bundle import EngineKey
from robometer_ros.engine.runtime import LibraryMissingError

#: gpu_name recorded for TensorRT-RTX plans built ahead of time without a GPU
CPU_AOT_GPU = "cpu-aot"


def import_tensorrt(prefer: str | None = None) -> tuple[ModuleType, str]:
    """Import TensorRT (``tensorrt``) or else TensorRT-RTX (``tensorrt_rtx``); return (module, flavor).

    ``prefer`` ("tensorrt" / "tensorrt_rtx") forces one of them. Raises ``LibraryMissingError`` (a
    ``RuntimeUnavailableError``) naming each import error.
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
    raise LibraryMissingError("TensorRT is not importable here (" + "; ".join(errors) + ")")


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


def _gpu_from_driver(device_index: int) -> GpuIdentity | None:
    """Ask the CUDA driver (libcuda, via ctypes): works on desktops, servers and Jetson, needs no torch."""
    import ctypes
    import ctypes.util

    for name in ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")):
        if not name:
            continue
        try:
            cuda = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    device = ctypes.c_int()
    major, minor = ctypes.c_int(), ctypes.c_int()
    buf = ctypes.create_string_buffer(256)
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    if (
        cuda.cuInit(0) != 0
        or cuda.cuDeviceGet(ctypes.byref(device), device_index) != 0
        or cuda.cuDeviceGetName(buf, 256, device) != 0
        or cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device) != 0
        or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device) != 0
    ):
        return None
    return GpuIdentity(buf.value.decode(errors="replace"), f"{major.value}.{minor.value}")


def gpu_identity(device_index: int = 0) -> GpuIdentity | None:
    """Name and compute capability of CUDA device ``device_index``, or None without a usable GPU.

    Asks the CUDA driver first, then nvidia-smi, then torch only if it is already imported (a robot
    running the onnxruntime or tensorrt backend need not have torch, and importing it costs seconds).
    """
    try:
        found = _gpu_from_driver(device_index)
    except (OSError, AttributeError):
        found = None
    if found is not None:
        return found
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
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and device_index < torch.cuda.device_count():
        major, minor = torch.cuda.get_device_capability(device_index)
        return GpuIdentity(torch.cuda.get_device_name(device_index), f"{major}.{minor}")
    return None


def engine_key(flavor: str, version: str, gpu: GpuIdentity | None, precision: str) -> EngineKey:
    """The index key of a plan built by ``flavor`` ``version`` for ``gpu`` (None: TensorRT-RTX AOT)."""
    if gpu is None:
        return EngineKey(flavor, version, CPU_AOT_GPU, "aot", precision)
    return EngineKey(flavor, version, gpu.name, gpu.compute_capability, precision)


def slug(text: str) -> str:
    """A file-name-safe form of a GPU name or version."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()
