"""Per-step scoring cost on a GPU in torch bf16: reference vs frame cache vs frame cache + prefix KV reuse,
eager vs CUDA graphs, with peak GPU memory. Run by benchmarks/gpu_check.sh; prints one table.

The model is Robometer-4B-shaped with random weights (robometer_4b_config: text 2560 wide, 32 heads / 8 KV
heads, vision 1024 wide, deepstack at vision blocks 5/11/17), by default with all 36 text layers and 24
vision blocks (``--text-layers`` / ``--vision-depth`` shorten it), a small vocabulary (the embedding lookup
is not where time goes), 256x320 frames (80 visual tokens each; 8 frames make a ~830-token prompt).

Methods, per step t of an episode (the node scores the 8 subsampled frames of the prefix; the first and
the newest frame are always among them):

* ``reference``: the official way, ``RobometerModel.forward`` on all 8 frames (preprocessing and the
  vision encoder re-run for every frame, every step);
* ``cached``: preprocess + ``encode_frame`` for the new frame only (features cached by frame), then
  ``forward_language`` on the 8 cached frames;
* ``cached+prefix``: as ``cached``, but the language part's key/value cache for the prompt prefix (chat
  text + instruction + the first frame and its prog token, identical at every step of the episode) is
  computed once per episode (``RobometerModel.forward_prefix``) and each step runs only the suffix (the
  other 7 frames, their prog tokens, the end of the prompt) on top of it (``forward_suffix``): the code the
  torch backend runs and the exported prefix/suffix parts are traced from, cut where
  ``model.prompt.split_after_first_frame`` cuts. The first frame's heads come from the prefix pass.
* ``+graph``: the same step with the vision and language calls captured once as CUDA graphs (static input
  buffers; replayed each step; the prefix's keys/values are refreshed in place, never reallocated, so the
  suffix graph keeps reading them). torch.compile is not used: its compile time for 36 layers would not
  fit the 8-minute budget.
* ``offline ...`` (offline scoring, as robometer-score replays an episode: every frame already encoded,
  language work only): one ``forward_language`` per step, one ``forward_suffix`` per step, and one
  ``forward_suffix`` for ``--batch`` steps at once (the suffix part's batch axis; per-step time = call
  time / B).

Each row checks itself against the reference: the max |diff| of the progress logits of the same step.

    python benchmarks/bench_gpu.py                      # CUDA, bf16, full 4B shape
    python benchmarks/bench_gpu.py --device cpu --smoke # tiny model, fp32, seconds (the test runs this)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

INSTRUCTION = "pick up the red block and put it in the bowl"


@dataclass
class Result:
    method: str
    times: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    max_diff: float = 0.0
    note: str = ""


def build_model(args):
    import torch

    from robometer_ros.model.config import robometer_4b_config
    from robometer_ros.model.robometer import RobometerModel
    from robometer_ros.model.tiny import tiny_model, tiny_tokenizer
    from robometer_ros.model.tokenizer import backbone_token_ids

    torch.manual_seed(0)
    if args.smoke:
        model, tok = tiny_model(size="tiny")
        return model.to(args.device).eval(), tok, "tiny (2 text layers x 64, 2 vision blocks x 64)"
    tok = tiny_tokenizer()
    config = robometer_4b_config(vocab_size=tok.get_vocab_size(with_added_tokens=True),
                                 token_ids=backbone_token_ids(tok))
    text, vision = config.backbone["text_config"], config.backbone["vision_config"]
    text["num_hidden_layers"] = args.text_layers
    vision["depth"] = args.vision_depth
    vision["deepstack_visual_indexes"] = [i for i in vision["deepstack_visual_indexes"] if i < args.vision_depth][
        :args.text_layers]
    with torch.device(args.device):
        model = RobometerModel(config).eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = model.to(dtype=dtype)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    shape = (f"4B shape: {args.text_layers} of 36 text layers x 2560, {args.vision_depth} of 24 vision blocks x "
             f"1024, {params:.2f} B params")
    return model, tok, shape


def capture(fn: Callable[[], object], device) -> tuple[Callable[[], object], str]:
    """A CUDA-graph replay of ``fn`` (its outputs are the graph's static outputs), or ``fn`` and why not."""
    import torch

    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the capture (allocations, lazy init)
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    except Exception as exc:  # a capture that fails is a result too: the row says why
        return fn, f"capture failed: {type(exc).__name__}: {str(exc)[:80]}"

    def replay():
        graph.replay()
        return out

    return replay, ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 (fp32 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 3 steps: proves the script runs (CPU is fine)")
    p.add_argument("--text-layers", type=int, default=36)
    p.add_argument("--vision-depth", type=int, default=24)
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default 20, smoke 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--frame-size", default="256x320")
    p.add_argument("--episode-frames", type=int, default=40, help="frames in the episode the steps come from")
    p.add_argument("--batch", type=int, default=16,
                   help="steps per forward_suffix call in the offline batched row (default 16: an exported "
                        "bundle's max_batch)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("fp32" if args.smoke else "bf16")
    steps = args.steps or (3 if args.smoke else 20)

    import torch

    from robometer_ros.episode import subsample_indices
    from robometer_ros.model.prompt import PromptBuilder, split_after_first_frame
    from robometer_ros.preprocess import FramePreprocessor

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU (use --device cpu --smoke for the CPU check)")
    t0 = time.perf_counter()
    model, tok, shape = build_model(args)
    build_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"torch {torch.__version__}, {gpu}, {args.dtype}; {shape}; built in {build_s:.1f} s", flush=True)

    fh, fw = (int(x) for x in args.frame_size.split("x"))
    if args.smoke:
        fh, fw = 64, 96
    cfg = model.config
    prep = FramePreprocessor(fh, fw, cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size,
                             (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    grid = (1, fh // cfg.patch_size, fw // cfg.patch_size)
    k = cfg.num_frames
    layout = PromptBuilder(tok, cfg.spatial_merge_size).progress(INSTRUCTION, [grid] * k)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (fh, fw, 3), dtype=np.uint8) for _ in range(args.episode_frames)]

    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    ids, pos, vindex, vmask = dev(layout.input_ids), dev(layout.position_ids), dev(layout.visual_index), \
        dev(layout.visual_mask)
    prog = dev(layout.prog_positions)
    grid_t, mm = dev(layout.image_grid_thw), dev(layout.mm_token_type_ids)
    seq = int(layout.input_ids.shape[1])
    tpf = model.tokens_per_frame(grid)
    # the prefix: the chat text, the instruction, the first frame and its prog token (what the exported
    # language_prefix part and the torch backend's forward_prefix take); the suffix: the rest of the prompt
    split = split_after_first_frame(layout)
    prefix = int(split.prefix_input_ids.shape[1])
    suffix = seq - prefix
    print(f"prompt {seq} tokens ({k} frames x {tpf} visual tokens), prefix {prefix}, suffix {suffix}", flush=True)
    p_ids, p_pos, p_vindex, p_vmask = (dev(a) for a in (split.prefix_input_ids, split.prefix_position_ids,
                                                        split.prefix_visual_index, split.prefix_visual_mask))
    s_ids, s_pos, s_vindex, s_vmask, s_prog = (dev(a) for a in (
        split.suffix_input_ids, split.suffix_position_ids, split.suffix_visual_index, split.suffix_visual_mask,
        split.suffix_prog_positions))

    # the steps: the last `steps` frames of the episode, after `warmup` untimed ones
    step_ts = list(range(args.episode_frames - steps - args.warmup, args.episode_frames))
    selections = {t: subsample_indices(t + 1, k) for t in step_ts}
    assert all(sel[0] == 0 for sel in selections.values())  # the subsampling always keeps the first frame

    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # frame -> (visual, deepstack)

    def encode(i: int) -> None:
        cache[i] = tuple(x.clone() for x in model.encode_frame(dev(prep(frames[i])), grid))

    @torch.inference_mode()
    def reference_step(t: int) -> torch.Tensor:
        pixels = dev(np.concatenate([prep(frames[i]) for i in selections[t]]))
        return model.forward(ids, pixels, grid_t, mm, prog)["progress_logits"]

    def language(sel: list[int]) -> torch.Tensor:
        visual = torch.cat([cache[i][0] for i in sel])
        deep = torch.cat([cache[i][1] for i in sel], dim=1)
        return model.forward_language(ids, pos, visual, deep, vindex, vmask, prog)["progress_logits"]

    @torch.inference_mode()
    def cached_step(t: int) -> torch.Tensor:
        encode(t)
        return language(selections[t])

    # the prefix pass's results live in these tensors for the whole run: a recomputed prefix is copied into
    # them, so a CUDA graph captured on them keeps reading valid memory
    prefix_state: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def compute_prefix() -> None:
        # frame 0 and the instruction are the same all episode: once per episode
        if 0 not in cache:
            encode(0)
        out = model.forward_prefix(p_ids, p_pos, cache[0][0], cache[0][1], p_vindex, p_vmask)
        for name in ("past_keys", "past_values", "progress_logits"):
            if name in prefix_state:
                prefix_state[name].copy_(out[name])
            else:
                prefix_state[name] = out[name].clone()

    def suffix_logits(visual: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """forward_suffix for B prompts: visual [B, 7T, H], deep [B, k, 7T, H] -> progress logits [B, 7, bins]."""
        return model.forward_suffix(s_ids, s_pos, visual, deep, s_vindex, s_vmask, s_prog,
                                    prefix_state["past_keys"], prefix_state["past_values"])["progress_logits"]

    def with_first(rest: torch.Tensor) -> torch.Tensor:
        """The 8 frames' progress logits: the first frame's from the prefix pass, the others' from the suffix."""
        return torch.cat([prefix_state["progress_logits"], rest])

    def suffix_inputs(sels: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        visual = torch.stack([torch.cat([cache[i][0] for i in sel[1:]]) for sel in sels])
        deep = torch.stack([torch.cat([cache[i][1] for i in sel[1:]], dim=1) for sel in sels])
        return visual, deep

    @torch.inference_mode()
    def prefix_step(t: int) -> torch.Tensor:
        encode(t)
        return with_first(suffix_logits(*suffix_inputs([selections[t]]))[0])

    # graphs: static buffers for the new frame's pixels and the frames' features
    graph_fns: dict[str, Callable[[int], torch.Tensor]] = {}
    graph_note = "" if cuda else "CUDA only"
    if cuda:
        with torch.inference_mode():
            encode(0)
            static_pixels = dev(prep(frames[0]))
            static_visual = torch.cat([cache[0][0]] * k)
            static_deep = torch.cat([cache[0][1]] * k, dim=1)
            static_suffix_visual = torch.cat([cache[0][0]] * (k - 1))[None]
            static_suffix_deep = torch.cat([cache[0][1]] * (k - 1), dim=1)[None]
            compute_prefix()
            vision_graph, why_v = capture(lambda: model.encode_frame(static_pixels, grid), device)
            lang_graph, why_l = capture(lambda: model.forward_language(
                ids, pos, static_visual, static_deep, vindex, vmask, prog)["progress_logits"], device)
            suffix_graph, why_s = capture(lambda: suffix_logits(static_suffix_visual, static_suffix_deep), device)
        graph_note = "; ".join(w for w in (why_v, why_l, why_s) if w)

        def graph_encode(t: int) -> list[int]:
            static_pixels.copy_(dev(prep(frames[t])))
            visual, deep = vision_graph()
            cache[t] = (visual.clone(), deep.clone())
            return selections[t]

        @torch.inference_mode()
        def cached_graph_step(t: int) -> torch.Tensor:
            sel = graph_encode(t)
            torch.cat([cache[i][0] for i in sel], out=static_visual)
            torch.cat([cache[i][1] for i in sel], dim=1, out=static_deep)
            return lang_graph().clone()

        @torch.inference_mode()
        def prefix_graph_step(t: int) -> torch.Tensor:
            sel = graph_encode(t)
            torch.cat([cache[i][0] for i in sel[1:]], out=static_suffix_visual[0])
            torch.cat([cache[i][1] for i in sel[1:]], dim=1, out=static_suffix_deep[0])
            return with_first(suffix_graph()[0])

        graph_fns = {"cached+graph": cached_graph_step, "cached+prefix+graph": prefix_graph_step}

    methods: dict[str, Callable[[int], torch.Tensor]] = {"reference": reference_step, "cached": cached_step,
                                                         "cached+prefix": prefix_step, **graph_fns}
    with torch.inference_mode():
        ref_logits = {t: reference_step(t).float().cpu() for t in step_ts}
    results = []
    prefix_s = None

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def read_peak(result: Result) -> None:
        if cuda:
            result.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20

    for name, fn in methods.items():
        cache.clear()
        if name != "reference":  # the episode so far is cached (real memory, untimed); the reference keeps none
            with torch.inference_mode():
                for i in range(step_ts[0]):
                    encode(i)
        if "prefix" in name:
            sync()
            t1 = time.perf_counter()
            compute_prefix()
            sync()
            prefix_s = time.perf_counter() - t1
        reset_peak()
        result = Result(name, note=graph_note if "graph" in name else "")
        for j, t in enumerate(step_ts):
            sync()
            start = time.perf_counter()
            logits = fn(t)
            sync()
            if j >= args.warmup:
                result.times.append(time.perf_counter() - start)
            result.max_diff = max(result.max_diff, float((logits.float().cpu() - ref_logits[t]).abs().max()))
        read_peak(result)
        results.append(result)
        print(f"  {name}: median {np.median(result.times) * 1e3:.2f} ms", flush=True)

    # offline scoring: every frame already encoded, language work only, per-step time
    batch = max(1, min(args.batch, len(step_ts)))
    chunk = step_ts[-batch:]
    with torch.inference_mode():
        cache.clear()
        for i in range(step_ts[-1] + 1):
            encode(i)
        compute_prefix()

        def one_at_a_time(name: str, step: Callable[[list[int]], torch.Tensor]) -> Result:
            result = Result(name, note="frames pre-encoded")
            step(selections[chunk[0]])  # warm-up
            reset_peak()
            for t in chunk:
                sync()
                start = time.perf_counter()
                logits = step(selections[t])
                sync()
                result.times.append(time.perf_counter() - start)
                result.max_diff = max(result.max_diff, float((logits.float().cpu() - ref_logits[t]).abs().max()))
            read_peak(result)
            return result

        offline = [one_at_a_time("offline plain, 1 step/call", language),
                   one_at_a_time("offline prefix, 1 step/call",
                                 lambda sel: with_first(suffix_logits(*suffix_inputs([sel]))[0]))]
        batched = Result(f"offline prefix, {batch} steps/call", note="frames pre-encoded; ms per step")
        visual, deep = suffix_inputs([selections[t] for t in chunk])
        suffix_logits(visual, deep)  # warm-up
        reset_peak()
        for _ in range(max(2, steps // batch)):
            sync()
            start = time.perf_counter()
            logits = suffix_logits(*suffix_inputs([selections[t] for t in chunk]))
            sync()
            batched.times.append((time.perf_counter() - start) / batch)
        read_peak(batched)
        for row, t in enumerate(chunk):
            batched.max_diff = max(batched.max_diff,
                                   float((with_first(logits[row]).float().cpu() - ref_logits[t]).abs().max()))
        offline.append(batched)
    results.extend(offline)
    for r in offline:
        print(f"  {r.method}: median {np.median(r.times) * 1e3:.2f} ms per step", flush=True)

    base = float(np.median(results[0].times))
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print()
    if not cuda:
        print("CUDA-graph rows: CUDA only")
    print(f"{gpu}, torch {torch.__version__}, {args.dtype}, {shape}; prompt {seq} tokens (prefix {prefix}, "
          f"suffix {suffix}); {steps} timed steps per method after {args.warmup} warm-up; weights {weights_mb:.0f} MiB"
          + (f"; prefix pass {prefix_s * 1e3:.2f} ms once per episode" if prefix_s is not None else ""))
    print("| method | median ms | p90 ms | vs reference | peak GPU MiB | max abs diff vs reference | note |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        median, p90 = float(np.median(r.times)), float(np.percentile(r.times, 90))
        peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-"
        print(f"| {r.method} | {median * 1e3:.2f} | {p90 * 1e3:.2f} | {base / median:.2f}x | {peak} | "
              f"{r.max_diff:.2e} | {r.note} |")
    rates = ", ".join(f"{r.method.removeprefix('offline ')} {1 / float(np.median(r.times)):.1f}" for r in offline)
    print(f"offline scoring steps/s ({len(chunk)} steps, language work only): {rates}")
    tolerance = 1e-3 if args.dtype == "fp32" else 0.25
    bad = [r.method for r in results if not r.max_diff <= tolerance]
    if bad:
        print(f"PARITY FAILED (> {tolerance} on progress logits): {', '.join(bad)}")
        return 1
    print(f"parity: every method within {tolerance} of the reference's progress logits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
