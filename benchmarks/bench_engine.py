"""Per-step scoring cost: the reference method vs the frame-caching RewardEngine (a script, not a test).

At every step of an episode of n frames the node scores the 8 subsampled frames of the prefix (first
and newest kept). Two ways to do that:

* reference (the official code): re-run the whole model on the 8 subsampled frames, re-encoding every
  frame. torch backend: ``RobometerModel.forward`` (transformers' Qwen3VLModel forward over all pixels);
  other backends: the vision part on each of the 8 frames, then the language part, nothing cached.
* cached: ``RewardEngine.add_frame`` for the one new frame (preprocess + vision part), then
  ``RewardEngine.score`` on the 8 cached frames (language part only).

Both include preprocessing. The exact-caching bound is (8V + L) / (V + L), V = one frame through
preprocessing + the vision part, L = the language part on 8 frames, both measured on the same backend
and machine: V and L are the medians of the cached steps' two halves in the same row. Reference and
cached steps alternate, so both see the same machine load. Memory: process RSS peak during the row
(process-wide and monotone, so it mostly shows the cache growing) and, on CUDA,
torch.cuda.max_memory_allocated per method; "cache MB" is the exact size of the cached frame features
at that episode length.

To keep the run short, the cache is filled for the first n - steps frames by copying the features of a
few encoded frames (real memory, no timing), and only the last ``--steps`` steps are timed.

Examples::

    python benchmarks/bench_engine.py                              # tiny + mid, torch + onnxruntime, CPU
    python benchmarks/bench_engine.py --configs 4b --device cuda --backends torch tensorrt --frame-size 256x320
"""

from __future__ import annotations

import argparse
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
    v: float
    lang: float
    rss_peak: float
    cache_mb: float
    cuda_ref_mb: float | None = None
    cuda_cached_mb: float | None = None

    @property
    def ratio(self) -> float:
        return statistics.median(self.ref) / statistics.median(self.cached)

    @property
    def bound(self) -> float:
        return (8 * self.v + self.lang) / (self.v + self.lang)


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

    from robometer_ros.model.config import robometer_4b_config
    from robometer_ros.model.robometer import RobometerModel
    from robometer_ros.model.tiny import tiny_model, tiny_tokenizer
    from robometer_ros.model.tokenizer import backbone_token_ids

    torch.manual_seed(0)
    if name in ("tiny", "mid"):
        model, tok = tiny_model(size=name)
    elif name == "4b":
        tok = tiny_tokenizer()
        # the real layer shapes; a small vocabulary (the embedding lookup is not where time goes)
        config = robometer_4b_config(vocab_size=tok.get_vocab_size(with_added_tokens=True),
                                     token_ids=backbone_token_ids(tok))
        with torch.device(device):
            model = RobometerModel(config).eval()
    else:
        raise SystemExit(f"unknown config {name!r} (tiny, mid, 4b)")
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    return model.to(device=device, dtype=dtype).eval(), tok


def time_call(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def fill_cache(engine, count: int, seed_ids: list) -> None:
    """Cache ``count`` frames (ids 0..count-1) by copying already-encoded features: real memory, no timing."""
    import copy

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


def run_backend(config: str, backend: str, model, tok, bundle, frames: list[np.ndarray], lengths: list[int],
                steps: int, device: str, threads: int) -> list[Row]:
    import torch

    from robometer_ros.engine.reward_engine import RewardEngine
    from robometer_ros.engine.torch_runtime import TorchRuntime

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    grid = bundle.manifest.frame.grid_thw
    if backend == "torch":
        engine = RewardEngine(bundle, runtime=TorchRuntime(model, grid, device))
    elif backend == "onnxruntime":
        providers = None if cuda else ["CPUExecutionProvider"]
        engine = RewardEngine(bundle, backend="onnxruntime", providers=providers, intra_op_threads=threads)
    else:
        engine = RewardEngine(bundle, backend="tensorrt")
    name = engine.backend_name
    k = bundle.manifest.num_frames

    # warm-up (first-run allocations, lazy session setup)
    for i in range(3):
        engine.add_frame(("warm", i), frames[i])
    engine.score(INSTRUCTION, [("warm", i % 3) for i in range(k)])
    engine.clear()

    # the reference method on this backend
    if backend == "torch":
        from robometer_ros.model.prompt import PromptBuilder

        builder = PromptBuilder(tok, bundle.manifest.frame.merge_size)
        prep = engine.preprocessor

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
                engine.add_frame(("ref", j), frames[i % len(frames)])
                ref_ids.append(("ref", j))
            engine.score(INSTRUCTION, ref_ids)
            engine.forget(ref_ids)

    rows = []
    for n in lengths:
        measured = list(range(max(0, n - steps), n))
        engine.clear()
        gc.collect()
        first = measured[0]
        seeds = list(range(min(4, max(first, 1))))
        for i in seeds:
            engine.add_frame(i, frames[i % len(frames)])
        fill_cache(engine, first, seeds)
        # Reference and cached steps alternate, so both see the same machine load (shared CPUs are noisy);
        # the cached step's two halves give this row's own V (add_frame) and L (score on 8 frames).
        ref_times, cached_times, v_times, l_times = [], [], [], []
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
            v_times.append(time_call(lambda t=t: engine.add_frame(t, frames[t % len(frames)]), sync))
            l_times.append(time_call(lambda ids=ids: engine.score(INSTRUCTION, ids), sync))
            cached_times.append(v_times[-1] + l_times[-1])
            if cuda:
                cuda_cached = max(cuda_cached, torch.cuda.max_memory_allocated() / 1e6)
            peak = max(peak, rss_mb())
        rows.append(Row(config, name, n, ref_times, cached_times, statistics.median(v_times),
                        statistics.median(l_times), peak, engine.cache_nbytes / 1e6,
                        cuda_ref if cuda else None, cuda_cached if cuda else None))
        print(f"  {config} {name} n={n}: ref {statistics.median(ref_times) * 1e3:.1f} ms, "
              f"cached {statistics.median(cached_times) * 1e3:.1f} ms", flush=True)
    engine.clear()
    engine.close()
    return rows


def print_table(rows: list[Row], cuda: bool) -> None:
    head = ("| config | backend | episode frames | reference median / p90 ms | cached median / p90 ms | ratio "
            "| bound (8V+L)/(V+L) | % of bound | V ms | L ms | RSS peak MB | cache MB |")
    if cuda:
        head += " CUDA peak ref / cached MB |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        ref_ms, ref_p90 = statistics.median(r.ref) * 1e3, p90(r.ref) * 1e3
        line = (f"| {r.config} | {r.backend} | {r.length} | {ref_ms:.2f} / {ref_p90:.2f} "
                f"| {statistics.median(r.cached) * 1e3:.2f} / {p90(r.cached) * 1e3:.2f} | {r.ratio:.2f}x "
                f"| {r.bound:.2f}x | {100 * r.ratio / r.bound:.0f}% | {r.v * 1e3:.2f} | {r.lang * 1e3:.2f} "
                f"| {r.rss_peak:.0f} | {r.cache_mb:.1f} |")
        if cuda:
            line += f" {r.cuda_ref_mb:.0f} / {r.cuda_cached_mb:.0f} |"
        print(line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "mid"], help="tiny, mid, 4b (4b: random weights)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="torch onnxruntime tensorrt (default: those available; tensorrt only with a GPU)")
    p.add_argument("--lengths", nargs="+", type=int, default=[8, 32, 128, 512])
    p.add_argument("--steps", type=int, default=6, help="timed steps per episode length (the last ones)")
    p.add_argument("--frame-size", default="256x320", help="model frame size HxW (multiples of 32)")
    p.add_argument("--camera-size", default="240x320", help="camera frame size HxW (resized by preprocessing)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (torch backend and the 4b model)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default=None,
                   help="weights of every backend (default fp32 on cpu, fp16 on cuda)")
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
    fh, fw = (int(x) for x in args.frame_size.split("x"))
    ch, cw = (int(x) for x in args.camera_size.split("x"))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (ch, cw, 3), dtype=np.uint8) for _ in range(16)]
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, dtype {dtype}, "
          f"frame {fh}x{fw} (camera {ch}x{cw}), steps {args.steps}, cpu count {os.cpu_count()}")

    from robometer_ros.training.export import export_bundle

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        for config in args.configs:
            model, tok = build_model(config, args.device, dtype)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            t0 = time.perf_counter()
            needs_onnx = any(b != "torch" for b in backends)
            # the torch backend needs no ONNX, but the bundle carries the tokenizer, frame spec and limits
            # (the exporter's parity check runs ONNX Runtime on CPU: skipped on GPU runs, where a 4B model
            # would take minutes there; the engine tests cover parity)
            bundle = export_bundle(model, tok, Path(tmp) / config, frame_size=(fh, fw), fp16=(dtype == "fp16"),
                                   check_parity=needs_onnx and not cuda, log=lambda *_: None)
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
                    rows += run_backend(config, backend, model, tok, bundle, frames, args.lengths, args.steps,
                                        args.device, args.threads)
                except RuntimeUnavailableError as exc:
                    print(f"{config}: skipping {backend}: {exc}", flush=True)
            del model
            gc.collect()
    print()
    print_table(rows, cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
