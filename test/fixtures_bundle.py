"""The tiny Robometer bundle, built once per test session and shared by engine, node and training tests.

Use the ``tiny_bundle`` fixture (session scope). The bundle directory is shared: tests that modify a
bundle (validation errors, engine builds) work on ``copy_bundle(tiny_bundle.path, tmp_path / "b")``.

To use it from a conftest: ``from fixtures_bundle import tiny_bundle  # noqa: F401``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

#: small and non-square, so a height/width mix-up changes shapes: 4x6 patches, 6 tokens per frame
TINY_FRAME_SIZE = (64, 96)
TINY_INSTRUCTION = "open the top drawer"


@dataclass
class TinyBundle:
    """The exported bundle and the in-memory model it was exported from (same weights)."""

    path: Path
    bundle: Any  # robometer_ros.engine.bundle.Bundle
    model: Any  # robometer_ros.model.robometer.RobometerModel (fp32, eval)
    tokenizer: Any  # tokenizers.Tokenizer


def build_tiny_bundle(out_dir: Path, include_checkpoint: bool | None = None, **export_options: Any) -> TinyBundle:
    """Export the seed-0 tiny model as a bundle at ``out_dir`` (about 1 s on one core)."""
    import torch

    from robometer_ros.model.tiny import tiny_model
    from robometer_ros.training.export.onnx_export import export_bundle

    torch.set_num_threads(1)
    model, tokenizer = tiny_model(seed=0)
    if include_checkpoint is None:
        # the torch backend reads checkpoint/; write it whenever checkpoint I/O exists
        try:
            import robometer_ros.model.checkpoint  # noqa: F401

            include_checkpoint = True
        except ImportError:
            include_checkpoint = False
    bundle = export_bundle(
        model, tokenizer, out_dir, frame_size=TINY_FRAME_SIZE, model_id="robometer-tiny-test",
        include_checkpoint=include_checkpoint, log=lambda *_: None, **export_options,
    )
    return TinyBundle(out_dir, bundle, model, tokenizer)


def build_mid_bundle(out_dir: Path) -> Any:
    """Export the seed-1 mid config (4 text layers x 512, 2 deepstack levels) with its prefix parts (~12 s).

    Tests that need more than the tiny model's single deepstack level and 64-wide hidden state use it (the
    deepstack concatenation is then a strided copy). The exporter's own parity check (1e-4) is skipped: the
    tests that use this bundle hold it to 1e-5 themselves. Returns the opened ``Bundle``.
    """
    import torch

    from robometer_ros.model.tiny import tiny_model
    from robometer_ros.training.export.onnx_export import export_bundle

    torch.set_num_threads(1)
    model, tokenizer = tiny_model(seed=1, size="mid")
    return export_bundle(model, tokenizer, out_dir, frame_size=TINY_FRAME_SIZE, model_id="robometer-mid-test",
                         log=lambda *_: None, check_parity=False)


def copy_bundle(src: Path, dst: Path) -> Path:
    """A private, writable copy of a bundle directory."""
    shutil.copytree(src, dst)
    return dst


def random_frames(count: int, seed: int = 0, height: int = 48, width: int = 80) -> list[np.ndarray]:
    """``count`` random uint8 RGB frames of a camera size different from the bundle's (exercises resizing)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    """The tiny bundle, exported once per session (read-only: copy it before modifying)."""
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle") / "bundle")
