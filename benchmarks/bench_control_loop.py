"""Does scoring starve a 30 Hz control loop on the same CPUs? Deadline misses with and without ThreadLimits.

Two processes per scenario:

* the *control* process: a 30 Hz loop on an absolute schedule; each period does a fixed amount of CPU work
  (calibrated to ``--work-ms`` on the idle machine before anything runs) and must finish before the period
  ends. It records, per period, the wake-up delay and the lateness of the finish against the deadline
  (period end); a miss is a finish after the deadline. It runs at the normal priority, on any CPU
  (``--control-cpu`` pins it).
* the *scoring* process: a RewardEngine (ONNX Runtime, CPU) doing what the node does with
  ``scoring_rate: 0``: every step encodes one new frame and scores the 8 subsampled frames, as fast as it
  can. With limits it is created through ``run_with_limits`` and its scoring thread calls
  ``ThreadLimits.apply_to_current_thread()`` (exactly the node's calls, see README "Scoring next to a
  control loop"). It reports its step rate and step time, so the cost of the limits shows too.

With ``--scorer node`` the scoring process is the reward node itself (``python -m robometer_ros.reward_node``
with ``scoring.intra_op_threads`` / ``scoring.cpu_affinity`` / ``scoring.nice`` set, every frame admitted) fed by
a 30 Hz 320x240 camera from the benchmark's own process: the same limits through the node's parameters, with
the node's executor, worker and DDS traffic on the CPUs too.

Scenarios: control alone (the machine's own noise), scoring without limits (ONNX Runtime's default
threads), then each limit alone and together. The table prints at the end.

    python benchmarks/bench_control_loop.py                       # mid model (4 layers x 512), 20 s each
    python benchmarks/bench_control_loop.py --config tiny --seconds 10
    python benchmarks/bench_control_loop.py --scorer node         # the reward node under a 30 Hz camera
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # node_driver

INSTRUCTION = "pick up the red block and put it in the bowl"


# ------------------------------------------------------------------------------------------- control
def _work(iterations: int) -> float:
    acc = 0.0
    for i in range(iterations):
        acc += (i % 7) * 0.5
    return acc


def calibrate(work_ms: float) -> int:
    """Iterations of ``_work`` that take ``work_ms`` on this machine now (best of a few tries)."""
    n = 20000
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        _work(n)
        best = min(best, time.perf_counter() - t)
    return max(1, int(n * work_ms / 1e3 / best))


def run_control(hz: float, seconds: float, iterations: int, cpu: int | None) -> dict:
    """Run the loop; per cycle: wake-up delay and lateness (finish - deadline); ticks skipped by overruns.

    Like a ROS timer, a cycle that overruns its period does not queue the ticks it ate: the next cycle
    starts at the next tick still in the future, and every tick passed without a cycle is a missed period.
    """
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    period = 1.0 / hz
    total = round(seconds * hz)
    start = time.perf_counter() + 0.05
    wake, late, skipped = [], [], 0
    k = 0
    while k < total:
        tick = start + k * period
        now = time.perf_counter()
        if now < tick:
            time.sleep(tick - now)
        woke = time.perf_counter()
        _work(iterations)
        done = time.perf_counter()
        wake.append(woke - tick)
        late.append(done - (tick + period))
        next_k = max(k + 1, math.ceil((done - start) / period))
        skipped += min(next_k, total) - k - 1
        k = next_k
    return {"late": late, "wake": wake, "skipped": skipped, "ticks": total, "cpu_s": time.process_time()}


# ------------------------------------------------------------------------------------------- scoring
def run_scoring(bundle: str, threads: int, cpus: list[int], nice: int, ready_file: str) -> dict:
    from robometer_ros.engine.reward_engine import RewardEngine
    from robometer_ros.engine.threads import ThreadLimits, run_with_limits
    from robometer_ros.episode import subsample_indices

    limits = ThreadLimits(threads, tuple(cpus), nice)
    engine = run_with_limits(limits, RewardEngine, bundle, backend="onnxruntime",
                             providers=["CPUExecutionProvider"], verify_checksums=False,
                             **limits.runtime_options())
    applied = limits.apply_to_current_thread() if not limits.is_default else None
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(8)]
    engine.warmup()
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    Path(ready_file).write_text("ready")
    steps, step_s, t = 0, [], 0
    began, cpu0 = time.perf_counter(), time.process_time()
    while not stop["now"]:
        s = time.perf_counter()
        engine.add_frame(t, frames[t % len(frames)])
        engine.score(INSTRUCTION, subsample_indices(t + 1, engine.num_frames))
        step_s.append(time.perf_counter() - s)
        steps += 1
        t += 1
        if t == 64:  # a new episode every 64 frames keeps the cache bounded
            engine.clear()
            t = 0
    elapsed = time.perf_counter() - began
    return {"steps": steps, "elapsed": elapsed, "cpu_s": time.process_time() - cpu0, "step_s": step_s,
            "backend": engine.backend_name,
            "applied": applied.describe() if applied else "no limits"}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_node_scoring(bundle: str, threads: int, cpus: list[int], nice: int, ready_file: str) -> dict:
    """The reward node with the limits as its ``scoring.*`` parameters, fed by a 30 Hz camera until SIGTERM."""
    import threading

    from node_driver import NodeRun, work_dir

    from robometer_ros.ros_graph import DomainLease

    lease = DomainLease()
    affinity = ",".join(str(c) for c in cpus)
    params = {"frame_rate": 0.0, "scoring.intra_op_threads": threads, "scoring.nice": nice,
              "scoring.cpu_affinity": f"'{affinity}'"}
    run = NodeRun(Path(bundle), params, work=work_dir("bench_control_node_"), domain_id=lease.domain_id,
                  backend="onnxruntime")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run.start_instruction(INSTRUCTION)
        def publish() -> None:
            while not stop.is_set():
                run.camera(320, 240, rate=30.0, seconds=0.5)

        camera = threading.Thread(target=publish, daemon=True)
        camera.start()
        while not run.reward_times and not stop.is_set():
            time.sleep(0.05)
        node_cpu0, cpu0 = _cpu_seconds(run.proc.pid), time.process_time()
        first = len(run.reward_times)
        began = time.perf_counter()
        Path(ready_file).write_text("ready")
        stop.wait()
        elapsed = time.perf_counter() - began
        cpu_s = _cpu_seconds(run.proc.pid) - node_cpu0 + time.process_time() - cpu0
        camera.join(5)
        applied = re.search(r"scoring worker (thread \d+: .*)", run.log_path.read_text(errors="replace"))
        return {"steps": len(run.reward_times) - first, "elapsed": elapsed, "cpu_s": cpu_s,
                "step_s": [ms / 1e3 for ms in run.inference_ms[first:]],
                "backend": run.diagnostics().get("backend", "?") + " (reward node)",
                "applied": applied.group(1) if applied else "no limits"}
    finally:
        run.close()
        lease.release()


# ------------------------------------------------------------------------------------------- driver
def _child(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)


def _busy_jiffies() -> int:
    """Busy CPU jiffies of the whole machine so far, all CPUs (/proc/stat: everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]


def scenario(name: str, bundle: str | None, limits: tuple[int, list[int], int] | None, args, iterations: int) -> dict:
    """One run: start the scorer (if any), run the control loop, stop the scorer; CPU used by everyone else."""
    scorer = None
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        if limits is not None:
            threads, cpus, nice = limits
            scorer = _child(["--role", "scoring", "--scorer", args.scorer, "--bundle", bundle,
                             "--threads", str(threads), "--cpus", ",".join(str(c) for c in cpus),
                             "--nice", str(nice), "--ready", str(ready)])
            while not ready.exists():
                if scorer.poll() is not None:
                    raise SystemExit(f"{name}: the scoring process exited with {scorer.returncode}")
                time.sleep(0.1)
            time.sleep(1.0)  # let it reach its steady state
        control_args = ["--role", "control", "--hz", str(args.hz), "--seconds", str(args.seconds),
                        "--iterations", str(iterations)]
        if args.control_cpu is not None:
            control_args += ["--control-cpu", str(args.control_cpu)]
        busy0 = _busy_jiffies()
        wall0 = time.perf_counter()
        control = _child(control_args)
        out, _ = control.communicate()
        wall = time.perf_counter() - wall0
        busy1 = _busy_jiffies()
        result = {"name": name, "control": json.loads(out)}
        ours = result["control"]["cpu_s"]
        if scorer is not None:
            scorer.send_signal(signal.SIGTERM)
            sout, _ = scorer.communicate(timeout=120)
            result["scoring"] = json.loads(sout)
            s = result["scoring"]
            ours += s["cpu_s"] * min(1.0, wall / s["elapsed"])  # its CPU rate over the control loop's window
        # everyone else on the machine (other users' jobs) during the control loop, in CPUs
        result["background_cpus"] = max(0.0, ((busy1 - busy0) / os.sysconf("SC_CLK_TCK") - ours) / wall)
    return result


def _aggregate(runs: list[dict]) -> dict:
    late = np.concatenate([np.array(r["control"]["late"]) for r in runs]) * 1e3
    wake = np.concatenate([np.array(r["control"]["wake"]) for r in runs]) * 1e3
    ticks = sum(r["control"]["ticks"] for r in runs)
    per_run = [(int((np.array(r["control"]["late"]) > 0).sum()) + r["control"]["skipped"]) / r["control"]["ticks"]
               for r in runs]
    misses = int((late > 0).sum()) + sum(r["control"]["skipped"] for r in runs)
    out = {"ticks": ticks, "misses": misses, "per_run": per_run, "late": late, "wake": wake,
           "background": [r["background_cpus"] for r in runs]}
    scoring = [r["scoring"] for r in runs if r.get("scoring")]
    if scoring:
        out["steps_per_s"] = sum(s["steps"] for s in scoring) / sum(s["elapsed"] for s in scoring)
        out["step_ms"] = np.concatenate([np.array(s["step_s"]) for s in scoring]) * 1e3
        out["backend"], out["applied"] = scoring[0]["backend"], scoring[0]["applied"]
    return out


def print_table(names: list[str], results: dict[str, list[dict]], args) -> None:
    period_ms = 1e3 / args.hz
    print()
    control_cpu = args.control_cpu if args.control_cpu is not None else "any"
    print(f"control loop: {args.hz:g} Hz, {args.work_ms:g} ms of CPU work per {period_ms:.1f} ms period, control "
          f"CPU {control_cpu}; {args.rounds} rounds x {args.seconds:g} s per scenario, scenarios interleaved; "
          f"{os.cpu_count()} CPUs")
    print("| scenario | periods | missed periods (per round) | max lateness ms | p99 finish ms (of the period) "
          "| p99 wake-up delay ms | scoring steps/s | scoring step p50 / p99 ms | other load, CPUs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        a = _aggregate(results[name])
        finish = a["late"] + period_ms
        rounds = ", ".join(f"{100 * m:.0f}" for m in a["per_run"])
        if "steps_per_s" in a:
            steps = f"{a['steps_per_s']:.1f}"
            step = f"{np.percentile(a['step_ms'], 50):.0f} / {np.percentile(a['step_ms'], 99):.0f}"
        else:
            steps, step = "-", "-"
        background = ", ".join(f"{b:.1f}" for b in a["background"])
        print(f"| {name} | {a['ticks']} | {a['misses']} ({100 * a['misses'] / a['ticks']:.1f}%; {rounds}) "
              f"| {max(a['late'].max(), 0):.1f} | {np.percentile(finish, 99):.1f} "
              f"| {np.percentile(a['wake'], 99):.2f} | {steps} | {step} | {background} |")
    for name in names:
        a = _aggregate(results[name])
        if "backend" in a:
            print(f"  {name}: {a['backend']}, scoring thread {a['applied']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("driver", "control", "scoring"), default="driver", help=argparse.SUPPRESS)
    p.add_argument("--config", choices=("tiny", "mid"), default="mid", help="random-weight model to export")
    p.add_argument("--bundle", help="an existing bundle instead of exporting --config")
    p.add_argument("--scorer", choices=("engine", "node"), default="engine",
                   help="engine: a RewardEngine scoring loop; node: the reward node under a 30 Hz camera")
    p.add_argument("--seconds", type=float, default=10.0, help="control-loop seconds per scenario and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all scenarios (interleaved)")
    p.add_argument("--hz", type=float, default=30.0)
    p.add_argument("--work-ms", type=float, default=10.0, help="CPU work per control period")
    p.add_argument("--control-cpu", type=int, help="pin the control loop to this CPU (default: any)")
    p.add_argument("--limit-cpu", type=int, default=None, help="the scoring CPU in the limited scenarios "
                   "(default: the last CPU)")
    p.add_argument("--iterations", type=int, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cpus", default="", help=argparse.SUPPRESS)
    p.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.role == "control":
        print(json.dumps(run_control(args.hz, args.seconds, args.iterations, args.control_cpu)))
        return 0
    if args.role == "scoring":
        cpus = [int(c) for c in args.cpus.split(",") if c]
        run = run_node_scoring if args.scorer == "node" else run_scoring
        print(json.dumps(run(args.bundle, args.threads, cpus, args.nice, args.ready)))
        return 0

    iterations = calibrate(args.work_ms)
    cpu = args.limit_cpu if args.limit_cpu is not None else sorted(os.sched_getaffinity(0))[-1]
    with tempfile.TemporaryDirectory(prefix="bench_control_") as tmp:
        bundle = args.bundle
        if bundle is None:
            import torch

            from robometer_ros.model.tiny import tiny_model
            from robometer_ros.training.export.onnx_export import export_bundle

            torch.set_num_threads(1)
            model, tok = tiny_model(size=args.config)
            t0 = time.perf_counter()
            bundle = str(export_bundle(model, tok, Path(tmp) / args.config, frame_size=(256, 320),
                                       check_parity=False, log=lambda *_: None).root)
            print(f"exported the {args.config} model in {time.perf_counter() - t0:.1f} s", flush=True)
            del model
        scenarios = [
            ("control alone", None),
            ("scoring, no limits (ORT default threads)", (0, [], 0)),
            ("scoring, nice 10", (0, [], 10)),
            (f"scoring, 1 thread on CPU {cpu}", (1, [cpu], 0)),
            (f"scoring, 1 thread on CPU {cpu}, nice 10", (1, [cpu], 10)),
        ]
        results: dict[str, list[dict]] = {name: [] for name, _ in scenarios}
        for round_index in range(args.rounds):  # interleaved, so a burst of other load hits every scenario
            for name, limits in scenarios:
                print(f"round {round_index + 1}/{args.rounds}: {name}", flush=True)
                results[name].append(scenario(name, bundle, limits, args, iterations))
    print(f"control work: {iterations} iterations = {args.work_ms:g} ms on the idle machine at start")
    print_table([name for name, _ in scenarios], results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
