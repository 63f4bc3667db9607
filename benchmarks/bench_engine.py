"""Per-step scoring cost: the reference method vs the frame-caching RewardEngine, without and with prefix
reuse, and offline scoring one step at a time vs batched (a script, not a test).

At every step of an episode of n frames the node scores the 8 subsampled frames of the prefix (first
and newest kept). Three ways to do that:

* reference (the official code): re-run the whole model on the 8 subsampled frames, re-encoding every
  frame. torch backend: ``RobometerModel.forward`` (transformers' Qwen3VLModel forward over all pixels);
  other backends: the vision part on each of the 8 frames, then the plain language part, nothing cached.
* cached: ``RewardEngine.add_frame`` for the one new frame (preprocess + vision part), then
  ``RewardEngine.score`` on the 8 cached frames through the plain language part (``prefix_reuse=False``).
* cached + prefix: the same engine API with prefix reuse: the prompt prefix (chat text, instruction, first
  frame, its prog token) ran once for the episode, so ``score`` runs only the suffix part (7 frames and
  the end of the prompt) on the cached prefix keys/values.

All include preprocessing. Bounds, with V = one frame through preprocessing + the vision part, L = the
plain language part on 8 frames, L_s = the suffix part on 8 frames, all medians of the same row's steps:
exact frame caching can reach (8V + L) / (V + L); frame caching + prefix reuse (8V + L) / (V + L_s).
"% of bound" is the measured reference / cached+prefix ratio over the second bound. The three methods
alternate step by step, so they see the same machine load. P = the prefix part, once per episode (and
per instruction), not part of a step. Memory: process RSS peak during the row and, on CUDA,
torch.cuda.max_memory_allocated per method; "cache MB" is the exact size of the cached frame features
at that episode length, "prefix KV MB" the cached prefix keys/values (one per episode).

Offline scoring (the second table): an episode of ``--replay-frames`` frames is replayed as
robometer-score does (one scoring step per frame, frames already encoded): one ``score`` call per step
(plain, and with prefix reuse) vs one ``RewardEngine.score_batch`` call (prefix reuse, the suffix part on
``--batch-size`` stacked steps per call; default the engine's: 4 on a CPU, the bundle's max_batch on a
GPU). steps/s of the language work alone (best of two replays), and with the n frames' encoding (n x V).

To keep the run short, the cache is filled for the first n - steps frames by copying the features of a
few encoded frames (real memory, no timing), and only the last ``--steps`` steps are timed.

Configs: tiny and mid (tests' models), 4b (Robometer-4B shapes, random weights, a small vocabulary) and
4b-wide (the 4B layer widths with 2 decoder layers and 2 vision blocks, deepstack after both: about the
ratio of vision to language work per frame of the real 4B, at a size a CPU can run). Torch-only runs
export their bundle (tokenizer, frame spec, limits) from a tiny stand-in: the torch backend runs the
in-memory model, not the ONNX parts.

Examples::

    python benchmarks/bench_engine.py                              # tiny + mid, torch + onnxruntime, CPU
    python benchmarks/bench_engine.py --configs 4b-wide --backends torch --lengths 8 64 --steps 3
    python benchmarks/bench_engine.py --configs 4b --device cuda --backends torch tensorrt --frame-size 256x320
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robometer_ros.engine.runtime import RuntimeUnavailableError, module_available
from robometer_ros.episode import subsample_indices

INSTRUCTION = "pick up the red block and put it in the bowl"


@dataclass
class Row:
    config: str
    backend: str
    length: int
    ref: list[float]
    cached: list[float]
    prefixed: list[float] | None
    v: float
    lang: float
    lang_suffix: float | None
    prefix_part: float | None
    rss_peak: float
    cache_mb: float
    prefix_mb: float
    cuda_ref_mb: float | None = None
    cuda_cached_mb: float | None = None

    @property
    def ratio(self) -> float:
        return statistics.median(self.ref) / statistics.median(self.cached)

    @property
    def ratio_prefix(self) -> float | None:
        return None if self.prefixed is None else statistics.median(self.ref) / statistics.median(self.prefixed)

    @property
    def bound(self) -> float:
        return (8 * self.v + self.lang) / (self.v + self.lang)

    @property
    def bound_prefix(self) -> float | None:
        return None if self.lang_suffix is None else (8 * self.v + self.lang) / (self.v + self.lang_suffix)


@dataclass
class ReplayRow:
    config: str
    backend: str
    frames: int
    batch: int
    v: float
    plain: float  # seconds for all steps, one score call each
    prefixed: float | None
    batched: float | None

    def rate(self, seconds: float | None, with_encoding: bool = False) -> float | None:
        if seconds is None:
            return None
        return self.frames / (seconds + (self.frames * self.v if with_encoding else 0.0))


def p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux


def build_model(name: str, device: str, dtype_name: str):
    """A random-weight RobometerModel of the named size and its tokenizer."""
    import torch

    from robometer_ros.model.config import RobometerConfig, robometer_4b_config
    from robometer_ros.model.robometer import RobometerModel
    from robometer_ros.model.tiny import tiny_model, tiny_tokenizer
    from robometer_ros.model.tokenizer import backbone_token_ids

    torch.manual_seed(0)
    if name in ("tiny", "mid"):
        model, tok = tiny_model(size=name)
    elif name in ("4b", "4b-wide"):
        tok = tiny_tokenizer()
        # the real layer shapes; a small vocabulary (the embedding lookup is not where time goes)
        config = robometer_4b_config(vocab_size=tok.get_vocab_size(with_added_tokens=True),
                                     token_ids=backbone_token_ids(tok))
        if name == "4b-wide":
            backbone = copy.deepcopy(config.backbone)
            backbone["text_config"]["num_hidden_layers"] = 2
            backbone["vision_config"]["depth"] = 2
            backbone["vision_config"]["deepstack_visual_indexes"] = [0, 1]
            config = RobometerConfig(backbone=backbone, base_model_id="robometer_ros/4b-wide")
        with torch.device(device):
            model = RobometerModel(config).eval()
    else:
        raise SystemExit(f"unknown config {name!r} (tiny, mid, 4b, 4b-wide)")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    return model.to(device=device, dtype=dtype).eval(), tok


def time_call(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def fill_cache(engine, count: int, seed_ids: list) -> None:
    """Cache ``count`` frames (ids 0..count-1) by copying already-encoded features: real memory, no timing."""
    sources = [engine._cache[i] for i in seed_ids]
    for i in range(count):
        if i in engine._cache:
            continue
        src = sources[i % len(sources)]
        clone = copy.copy(src)
        clone.visual = src.visual.copy() if hasattr(src.visual, "copy") else src.visual.clone()
        clone.deepstack = src.deepstack.copy() if hasattr(src.deepstack, "copy") else src.deepstack.clone()
        with engine._cache_lock:
            engine._cache[i] = clone
            engine._cache_bytes += clone.nbytes


def make_engines(backend: str, model, bundle, device: str, threads: int):
    """(plain engine, prefix-reuse engine or None), sharing one runtime.

    With tensorrt the shared runtime then holds the language_prefix, language_suffix and (loaded by the plain
    engine's first step) language plans, each with its own copy of the decoder weights.
    """
    from robometer_ros.engine.reward_engine import RewardEngine
    from robometer_ros.engine.runtime import create_runtime
    from robometer_ros.engine.torch_runtime import TorchRuntime

    if backend == "torch":
        runtime = TorchRuntime(model, bundle.manifest.frame.grid_thw, device)
    elif backend == "onnxruntime":
        providers = None if device.startswith("cuda") else ["CPUExecutionProvider"]
        runtime = create_runtime(bundle, "onnxruntime", providers=providers, intra_op_threads=threads)
    else:
        runtime = create_runtime(bundle, "tensorrt")
    plain = RewardEngine(bundle, runtime=runtime, prefix_reuse=False)
    prefixed = RewardEngine(bundle, runtime=runtime) if runtime.supports_prefix else None
    return plain, prefixed


def run_backend(config: str, backend: str, model, tok, bundle, frames: list[np.ndarray], lengths: list[int],
                steps: int, device: str, threads: int, replay_frames: int,
                batch_size: int | None) -> tuple[list[Row], ReplayRow]:
    import torch

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    grid = bundle.manifest.frame.grid_thw
    plain, prefixed = make_engines(backend, model, bundle, device, threads)
    engines = [e for e in (plain, prefixed) if e is not None]
    name = plain.backend_name
    k = bundle.manifest.num_frames

    # warm-up (first-run allocations, lazy session setup)
    for engine in engines:
        for i in range(3):
            engine.add_frame(("warm", i), frames[i])
        engine.score(INSTRUCTION, [("warm", i % 3) for i in range(k)])
        engine.clear()

    # the reference method on this backend
    if backend == "torch":
        from robometer_ros.model.prompt import PromptBuilder

        builder = PromptBuilder(tok, bundle.manifest.frame.merge_size)
        prep = plain.preprocessor

        def reference_step(frame_idx: list[int]) -> None:
            layout = builder.progress(INSTRUCTION, [grid] * len(frame_idx))
            pixels = torch.from_numpy(np.concatenate([prep(frames[i % len(frames)]) for i in frame_idx]))
            with torch.inference_mode():
                model.forward(torch.from_numpy(layout.input_ids).to(device), pixels.to(device),
                              torch.from_numpy(layout.image_grid_thw).to(device),
                              torch.from_numpy(layout.mm_token_type_ids).to(device),
                              torch.from_numpy(layout.prog_positions).to(device))
    else:
        def reference_step(frame_idx: list[int]) -> None:
            ref_ids = []
            for j, i in enumerate(frame_idx):
                plain.add_frame(("ref", j), frames[i % len(frames)])
                ref_ids.append(("ref", j))
            plain.score(INSTRUCTION, ref_ids)
            plain.forget(ref_ids)

    rows = []
    for n in lengths:
        measured = list(range(max(0, n - steps), n))
        first = measured[0]
        seeds = list(range(min(4, max(first, 1))))
        for engine in engines:
            engine.clear()
        gc.collect()
        for engine in engines:
            for i in seeds:
                engine.add_frame(i, frames[i % len(frames)])
            fill_cache(engine, first, seeds)
        prefix_time = None
        if prefixed is not None:  # the episode's prefix, once (frame 0 is cached from the first step on)
            prefixed.forget([0])
            prefixed.add_frame(0, frames[0])
            prefix_time = time_call(lambda: prefixed.score(INSTRUCTION, [0]), sync)  # a 1-frame prompt: the prefix
        # Methods alternate step by step, so all see the same machine load (shared CPUs are noisy); each
        # cached step's two halves give this row's own V (add_frame) and L / L_s (score on 8 frames).
        ref_times, cached_times, prefix_times, v_times, l_times, ls_times = [], [], [], [], [], []
        peak = rss_mb()
        cuda_ref = cuda_cached = 0.0
        for t in measured:
            ids = subsample_indices(t + 1, k)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            ref_times.append(time_call(lambda ids=ids: reference_step(ids), sync))
            if cuda:
                cuda_ref = max(cuda_ref, torch.cuda.max_memory_allocated() / 1e6)
                torch.cuda.reset_peak_memory_stats()
            v_times.append(time_call(lambda t=t: plain.add_frame(t, frames[t % len(frames)]), sync))
            l_times.append(time_call(lambda ids=ids: plain.score(INSTRUCTION, ids), sync))
            cached_times.append(v_times[-1] + l_times[-1])
            if prefixed is not None:
                v = time_call(lambda t=t: prefixed.add_frame(t, frames[t % len(frames)]), sync)
                ls_times.append(time_call(lambda ids=ids: prefixed.score(INSTRUCTION, ids), sync))
                v_times.append(v)
                prefix_times.append(v + ls_times[-1])
            if cuda:
                cuda_cached = max(cuda_cached, torch.cuda.max_memory_allocated() / 1e6)
            peak = max(peak, rss_mb())
        rows.append(Row(config, name, n, ref_times, cached_times, prefix_times or None, statistics.median(v_times),
                        statistics.median(l_times), statistics.median(ls_times) if ls_times else None, prefix_time,
                        peak, plain.cache_nbytes / 1e6, prefixed.prefix_cache_nbytes / 1e6 if prefixed else 0.0,
                        cuda_ref if cuda else None, cuda_cached if cuda else None))
        line = (f"  {config} {name} n={n}: ref {statistics.median(ref_times) * 1e3:.1f} ms, "
                f"cached {statistics.median(cached_times) * 1e3:.1f} ms")
        if prefix_times:
            line += f", cached+prefix {statistics.median(prefix_times) * 1e3:.1f} ms"
        print(line, flush=True)

    # offline replay: one step per frame of an episode, frames already encoded
    v = statistics.median(r.v for r in rows)
    step_ids = [subsample_indices(t + 1, k) for t in range(replay_frames)]
    for engine in engines:
        engine.clear()
        for i in range(min(4, replay_frames)):
            engine.add_frame(i, frames[i % len(frames)])
        fill_cache(engine, replay_frames, list(range(min(4, replay_frames))))

    def replay_seconds(engine, batched: bool) -> float:
        """Best of two replays (the first also warms shape-specific allocations up); a prefix-reuse replay
        starts without the episode's prefix, so it pays for it once, as a real replay does."""
        best = float("inf")
        for _ in range(2):
            engine.forget([0])
            engine.add_frame(0, frames[0])
            if batched:
                seconds = time_call(lambda: engine.score_batch(INSTRUCTION, step_ids, batch_size=batch_size), sync)
            else:
                seconds = time_call(lambda: [engine.score(INSTRUCTION, ids) for ids in step_ids], sync)
            best = min(best, seconds)
        return best

    plain_s = replay_seconds(plain, batched=False)
    prefixed_s = batched_s = None
    if prefixed is not None:
        batch_size = batch_size or prefixed.default_batch_size
        prefixed_s = replay_seconds(prefixed, batched=False)
        batched_s = replay_seconds(prefixed, batched=True)
    replay = ReplayRow(config, name, replay_frames, batch_size or 1, v, plain_s, prefixed_s, batched_s)
    print(f"  {config} {name} replay of {replay_frames} steps: one at a time {plain_s:.2f} s"
          + (f", with prefix {prefixed_s:.2f} s, batched {batched_s:.2f} s" if prefixed_s is not None else ""),
          flush=True)
    for engine in engines:
        engine.clear()
    plain.close()
    return rows, replay


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def print_table(rows: list[Row], cuda: bool) -> None:
    head = ("| config | backend | episode frames | reference median / p90 ms | cached median / p90 ms "
            "| cached+prefix median / p90 ms | ratio cached | ratio cached+prefix | cached+prefix vs cached "
            "| bound (8V+L)/(V+L) | bound (8V+L)/(V+L_s) | % of bound (prefix) | V ms | L ms | L_s ms | P ms "
            "| RSS peak MB | cache MB | prefix KV MB |")
    if cuda:
        head += " CUDA peak ref / cached MB |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        ref_ms, ref_p90 = statistics.median(r.ref) * 1e3, p90(r.ref) * 1e3
        prefixed = "n/a" if r.prefixed is None else \
            f"{statistics.median(r.prefixed) * 1e3:.2f} / {p90(r.prefixed) * 1e3:.2f}"
        gain = None if r.prefixed is None else statistics.median(r.cached) / statistics.median(r.prefixed)
        share = None if r.ratio_prefix is None or r.bound_prefix is None else 100 * r.ratio_prefix / r.bound_prefix
        line = (f"| {r.config} | {r.backend} | {r.length} | {ref_ms:.2f} / {ref_p90:.2f} "
                f"| {statistics.median(r.cached) * 1e3:.2f} / {p90(r.cached) * 1e3:.2f} | {prefixed} "
                f"| {r.ratio:.2f}x | {_fmt(r.ratio_prefix, '.2f', 'x')} | {_fmt(gain, '.2f', 'x')} "
                f"| {r.bound:.2f}x | {_fmt(r.bound_prefix, '.2f', 'x')} | {_fmt(share, '.0f', '%')} "
                f"| {r.v * 1e3:.2f} | {r.lang * 1e3:.2f} | {_fmt(r.lang_suffix and r.lang_suffix * 1e3, '.2f')} "
                f"| {_fmt(r.prefix_part and r.prefix_part * 1e3, '.2f')} "
                f"| {r.rss_peak:.0f} | {r.cache_mb:.1f} | {r.prefix_mb:.2f} |")
        if cuda:
            line += f" {r.cuda_ref_mb:.0f} / {r.cuda_cached_mb:.0f} |"
        print(line)


def print_replay_table(rows: list[ReplayRow]) -> None:
    head = ("| config | backend | steps (episode frames) | one at a time, plain: steps/s | one at a time, prefix: "
            "steps/s | batched (prefix, batch B): steps/s | batched vs plain | batched vs prefix "
            "| with encoding n x V: plain / prefix / batched steps/s |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        plain, prefixed, batched = r.rate(r.plain), r.rate(r.prefixed), r.rate(r.batched)
        vs_plain = None if batched is None else batched / plain
        vs_prefix = None if batched is None or prefixed is None else batched / prefixed
        encoded = " / ".join(_fmt(r.rate(s, True), ".2f") for s in (r.plain, r.prefixed, r.batched))
        print(f"| {r.config} | {r.backend} | {r.frames} | {plain:.2f} | {_fmt(prefixed, '.2f')} "
              f"| {_fmt(batched, '.2f')} (B={r.batch}) | {_fmt(vs_plain, '.2f', 'x')} | {_fmt(vs_prefix, '.2f', 'x')} "
              f"| {encoded} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "mid"],
                   help="tiny, mid, 4b, 4b-wide (4b shapes: random weights)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="torch onnxruntime tensorrt (default: those available; tensorrt only with a GPU)")
    p.add_argument("--lengths", nargs="+", type=int, default=[8, 32, 128, 512])
    p.add_argument("--steps", type=int, default=6, help="timed steps per episode length (the last ones)")
    p.add_argument("--replay-frames", type=int, default=32, help="offline replay: episode frames = steps")
    p.add_argument("--batch-size", type=int, default=None,
                   help="offline replay: steps per score_batch suffix call (default: the engine's, 4 on a CPU)")
    p.add_argument("--frame-size", default="256x320", help="model frame size HxW (multiples of 32)")
    p.add_argument("--camera-size", default="240x320", help="camera frame size HxW (resized by preprocessing)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (torch backend and the 4b model)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="weights of every backend (default fp32 on cpu, fp16 on cuda; bf16: torch only)")
    p.add_argument("--threads", type=int, default=2, help="torch / onnxruntime CPU threads")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    dtype = args.dtype or ("fp16" if cuda else "fp32")
    backends = args.backends
    if backends is None:
        backends = ["torch"]
        if module_available("onnxruntime"):
            import onnxruntime

            # on a GPU box, ONNX Runtime on CPU is not a contender for a 4B model
            if not cuda or "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                backends.append("onnxruntime")
        if cuda:
            backends.append("tensorrt")
    if dtype == "bf16" and backends != ["torch"]:
        raise SystemExit("--dtype bf16 is for the torch backend only (the ONNX parts are fp32 or fp16)")
    fh, fw = (int(x) for x in args.frame_size.split("x"))
    ch, cw = (int(x) for x in args.camera_size.split("x"))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (ch, cw, 3), dtype=np.uint8) for _ in range(16)]
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, dtype {dtype}, "
          f"frame {fh}x{fw} (camera {ch}x{cw}), steps {args.steps}, replay {args.replay_frames} steps "
          f"(batch {args.batch_size or 'engine default'}), cpu count {os.cpu_count()}")

    from robometer_ros.training.export.onnx_export import export_bundle

    rows: list[Row] = []
    replays: list[ReplayRow] = []
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        for config in args.configs:
            model, tok = build_model(config, args.device, dtype)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            t0 = time.perf_counter()
            needs_onnx = any(b != "torch" for b in backends)
            source = model
            if not needs_onnx:
                # the torch backend runs `model` itself; the bundle only carries the tokenizer, frame spec and
                # limits, which a tiny model with the same tokenizer and frame size gives without minutes of export
                from robometer_ros.model.tiny import tiny_model

                source = tiny_model(tok)[0]
            # (the exporter's parity check runs ONNX Runtime on CPU: skipped on GPU runs, where a 4B model
            # would take minutes there; the engine tests cover parity)
            bundle = export_bundle(source, tok, Path(tmp) / config, frame_size=(fh, fw),
                                   fp16=(dtype == "fp16" and needs_onnx), check_parity=needs_onnx and not cuda,
                                   log=lambda *_: None)
            print(f"{config}: {params:.1f} M params, bundle in {time.perf_counter() - t0:.1f} s, "
                  f"{bundle.manifest.frame.tokens_per_frame} tokens/frame", flush=True)
            run_backends = list(backends)
            if "tensorrt" in backends:
                from robometer_ros.engine.tensorrt_build import EngineBuildError, build_engines

                try:
                    results = build_engines(bundle, precision="auto")
                    failed = [r.message for r in results if r.status == "failed"]
                    if failed:
                        raise EngineBuildError("; ".join(failed))
                except (RuntimeUnavailableError, EngineBuildError) as exc:
                    print(f"{config}: skipping tensorrt: {exc}", flush=True)
                    run_backends.remove("tensorrt")
            for backend in run_backends:
                try:
                    new_rows, replay = run_backend(config, backend, model, tok, bundle, frames, args.lengths,
                                                   args.steps, args.device, args.threads, args.replay_frames,
                                                   args.batch_size)
                    rows += new_rows
                    replays.append(replay)
                except RuntimeUnavailableError as exc:
                    print(f"{config}: skipping {backend}: {exc}", flush=True)
            del model, source
            gc.collect()
    print()
    print_table(rows, cuda)
    print()
    print_replay_table(replays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
