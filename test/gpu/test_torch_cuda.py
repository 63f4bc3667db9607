"""The torch model on a real GPU (what gpu_check.sh can test on a machine with CUDA torch but no TensorRT): prefix
reuse (forward_prefix once + a batch of forward_suffix prompts) equals the plain language part on the GPU, and the
GPU's results equal the CPU's, fp32, on the tiny and mid configs. No bundle and no ONNX export are needed.

Tolerance: 1e-4 on logits. The CPU tests hold prefix reuse to 1e-5; on the GPU the prefix + suffix attention and
the full prompt's attention are different kernels with different summation orders, and TF32 is switched off here
so that only that reordering remains."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

ATOL = 1e-4
INSTRUCTION = "open the top drawer"


@pytest.fixture(autouse=True)
def _no_tf32():
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("size", ["tiny", "mid"])
def test_prefix_reuse_on_the_gpu_equals_the_plain_language_part_and_the_cpu(size: str) -> None:
    import numpy as np
    import torch

    from robometer_ros.model.prompt import PromptBuilder, split_after_first_frame
    from robometer_ros.model.tiny import tiny_model

    model, tokenizer = tiny_model(seed=1, size=size)
    cpu_model = model.eval()
    gpu_model = tiny_model(seed=1, size=size)[0].to("cuda").eval()
    grid, frames, batch = (1, 4, 6), 8, 3
    layout = PromptBuilder(tokenizer, model.config.spatial_merge_size).progress(INSTRUCTION, [grid] * frames)
    split = split_after_first_frame(layout)
    rng = np.random.default_rng(0)
    pixels = [rng.uniform(-1, 1, (24, model.config.patch_dim)).astype(np.float32) for _ in range(1 + batch * 7)]

    def run(m, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        with torch.inference_mode():
            feats = [m.encode_frame(t(p), grid) for p in pixels]
            rows = [[feats[0], *feats[1 + 7 * b:8 + 7 * b]] for b in range(batch)]
            plain = torch.stack([m.forward_language(
                t(layout.input_ids), t(layout.position_ids), torch.cat([f[0] for f in row]),
                torch.cat([f[1] for f in row], 1), t(layout.visual_index), t(layout.visual_mask),
                t(layout.prog_positions))["progress_logits"] for row in rows])
            prefix = m.forward_prefix(t(split.prefix_input_ids), t(split.prefix_position_ids), *feats[0],
                                      t(split.prefix_visual_index), t(split.prefix_visual_mask))
            suffix = m.forward_suffix(
                t(split.suffix_input_ids), t(split.suffix_position_ids),
                torch.stack([torch.cat([f[0] for f in row[1:]]) for row in rows]),
                torch.stack([torch.cat([f[1] for f in row[1:]], 1) for row in rows]),
                t(split.suffix_visual_index), t(split.suffix_visual_mask), t(split.suffix_prog_positions),
                prefix["past_keys"], prefix["past_values"])["progress_logits"]
            reuse = torch.cat([prefix["progress_logits"][None].expand(batch, -1, -1), suffix], dim=1)
        return plain.float().cpu(), reuse.float().cpu()

    gpu_plain, gpu_reuse = run(gpu_model, "cuda")
    cpu_plain, _ = run(cpu_model, "cpu")
    torch.testing.assert_close(gpu_reuse, gpu_plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(gpu_plain, cpu_plain, atol=ATOL, rtol=0)
