"""PyTorch backend: the reference. Runs RobometerModel.encode_frame / forward_language directly.

Loads the bundle's ``checkpoint/`` (our safetensors layout) on CPU or CUDA. Frame features stay as
torch tensors on the model's device. Also wraps an in-memory model (``TorchRuntime(model)``), which
the tests and the benchmark use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from robometer_ros.engine.bundle import Bundle, BundleError
from robometer_ros.engine.runtime import (
    FrameFeatures,
    HeadOutputs,
    LanguageInputs,
    PrefixInputs,
    PrefixState,
    Runtime,
    SuffixInputs,
)


class TorchRuntime(Runtime):
    """A RobometerModel in eval mode on one device.

    Prefix reuse needs no exported part here (``RobometerModel.forward_prefix`` / ``forward_suffix``), so
    it is on unless ``prefix_reuse=False``; the keys/values stay torch tensors on the model's device.
    """

    def __init__(self, model: Any, grid_thw: tuple[int, int, int], device: str | torch.device | None = None,
                 prefix_reuse: bool | None = None) -> None:
        self.device = torch.device(device) if device is not None else model.device
        self.model = model.eval().to(self.device)
        self.grid_thw = tuple(int(v) for v in grid_thw)
        self.backend_name = f"torch:{self.device.type}"
        self.supports_prefix = prefix_reuse is not False
        if self.device.type == "cpu":
            self.preferred_suffix_batch = 4  # larger batches lose on a CPU (benchmarks/bench_engine.py)

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: str = "cpu", intra_op_threads: int | None = None,
                    prefix_reuse: bool | None = None, **_: Any) -> TorchRuntime:
        """Load the bundle's checkpoint/ onto ``device``; ``intra_op_threads`` > 0 calls torch.set_num_threads."""
        if intra_op_threads:  # process-wide in torch; threads.ThreadLimits.runtime_options() passes it
            torch.set_num_threads(int(intra_op_threads))
        path = bundle.checkpoint_path
        if path is None:
            raise BundleError(f"{bundle.root}: no checkpoint/ in the bundle for the torch backend")
        from robometer_ros.model.checkpoint import load_checkpoint

        model, _ = load_checkpoint(path, device=device)
        if model.hidden_size != bundle.manifest.hidden_size:
            raise BundleError(
                f"{path}: checkpoint hidden size {model.hidden_size} != manifest {bundle.manifest.hidden_size}"
            )
        return cls(model, bundle.manifest.frame.grid_thw, device, prefix_reuse=prefix_reuse)

    def encode_frame(self, pixel_values: np.ndarray) -> FrameFeatures:
        """Vision part on one frame."""
        with torch.inference_mode():
            visual, deepstack = self.model.encode_frame(
                torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(self.device), self.grid_thw
            )
        return FrameFeatures(visual=visual, deepstack=deepstack)

    def run_language(self, inputs: LanguageInputs, frames: Sequence[FrameFeatures]) -> HeadOutputs:
        """Language part + heads on one prompt."""
        d = self.device
        with torch.inference_mode():
            out = self.model.forward_language(
                torch.from_numpy(inputs.input_ids).to(d),
                torch.from_numpy(inputs.position_ids).to(d),
                torch.cat([f.visual for f in frames], dim=0),
                torch.cat([f.deepstack for f in frames], dim=1),
                torch.from_numpy(inputs.visual_index).to(d),
                torch.from_numpy(inputs.visual_mask).to(d),
                torch.from_numpy(inputs.prog_positions).to(d),
                None if inputs.pref_position is None else torch.from_numpy(inputs.pref_position).to(d),
            )
        pref = out.get("preference_logit")
        return HeadOutputs(
            progress_logits=out["progress_logits"].float().cpu().numpy(),
            success_logits=out["success_logits"].float().cpu().numpy(),
            preference_logit=None if pref is None else pref.float().cpu().numpy(),
        )

    def _tensors(self, feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.ascontiguousarray(value)).to(self.device) for name, value in feed.items()}

    def run_prefix(self, inputs: PrefixInputs, first: FrameFeatures) -> PrefixState:
        """RobometerModel.forward_prefix; the keys/values stay on the model's device."""
        t = self._tensors(inputs.as_feed())
        with torch.inference_mode():
            out = self.model.forward_prefix(t["input_ids"], t["position_ids"], first.visual, first.deepstack,
                                            t["visual_index"], t["visual_mask"])
        return PrefixState(past_keys=out["past_keys"], past_values=out["past_values"],
                           progress_logits=out["progress_logits"].float().cpu().numpy(),
                           success_logits=out["success_logits"].float().cpu().numpy())

    def run_suffix(
        self, inputs: SuffixInputs, prefix: PrefixState, frames: Sequence[Sequence[FrameFeatures]]
    ) -> HeadOutputs:
        """RobometerModel.forward_suffix on a batch of prompts sharing ``prefix``."""
        t = self._tensors(inputs.as_feed())
        with torch.inference_mode():
            visual = torch.stack([torch.cat([f.visual for f in row], dim=0) for row in frames])
            deepstack = torch.stack([torch.cat([f.deepstack for f in row], dim=1) for row in frames])
            out = self.model.forward_suffix(t["input_ids"], t["position_ids"], visual, deepstack, t["visual_index"],
                                            t["visual_mask"], t["prog_positions"], prefix.past_keys,
                                            prefix.past_values)
        return HeadOutputs(progress_logits=out["progress_logits"].float().cpu().numpy(),
                           success_logits=out["success_logits"].float().cpu().numpy())
