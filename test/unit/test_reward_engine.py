"""RewardEngine: same outputs as the reference full forward (ONNX Runtime and torch backends), causality
through the cache, errors for bad calls, NaN detection, and a producer/scorer thread smoke test."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fixtures_bundle import TINY_INSTRUCTION, random_frames
from robometer_ros.engine.reward_engine import ModelOutputError, RewardEngine, Scores, UnknownFrameError
from robometer_ros.engine.runtime import HeadOutputs, create_runtime
from robometer_ros.engine.torch_runtime import TorchRuntime
from robometer_ros.model.progress import expected_progress_np, sigmoid_np
from robometer_ros.model.prompt import PromptBuilder
from robometer_ros.preprocess import FramePreprocessor

torch.set_num_threads(1)

# Whole pipeline (preprocess -> vision part per frame -> cache -> language part) vs the reference forward
# on all frames at once, fp32 on CPU: observed max |diff| of the logits ~1e-6.
LOGIT_ATOL = 1e-4
PROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return random_frames(10, seed=7)


@pytest.fixture(scope="module")
def ort_engine(tiny_bundle, frames) -> RewardEngine:
    engine = RewardEngine(tiny_bundle.bundle, backend="onnxruntime", intra_op_threads=1)
    for i, image in enumerate(frames):
        engine.add_frame(i, image)
    return engine


def reference_forward(tiny, frames: list[np.ndarray], instruction: str) -> dict[str, np.ndarray]:
    """The official method: the full model on all frames, re-encoding every frame."""
    m = tiny.bundle.manifest
    prep = FramePreprocessor(m.frame.height, m.frame.width)
    layout = PromptBuilder(tiny.tokenizer).progress(instruction, [m.frame.grid_thw] * len(frames))
    pixels = torch.from_numpy(np.concatenate([prep(f) for f in frames]))
    with torch.no_grad():
        out = tiny.model.forward(
            torch.from_numpy(layout.input_ids), pixels, torch.from_numpy(layout.image_grid_thw),
            torch.from_numpy(layout.mm_token_type_ids), torch.from_numpy(layout.prog_positions),
        )
    return {k: v.numpy() for k, v in out.items() if k != "hidden_states"}


def test_backend_name_reports_the_provider_that_runs(ort_engine) -> None:
    assert ort_engine.backend_name == "onnxruntime:CPUExecutionProvider"
    # the tiny bundle has the prefix-reuse parts: steps run language_suffix, the plain part is not opened
    assert ort_engine.prefix_reuse
    assert ort_engine.runtime.providers_in_use["language_suffix"][0] == "CPUExecutionProvider"
    assert "language" not in ort_engine.runtime.providers_in_use
    assert ort_engine.model_id == "robometer-tiny-test"
    assert ort_engine.num_frames == 8 and ort_engine.frame_size == (64, 96)


@pytest.mark.parametrize("ids", [list(range(8)), [0, 0, 2, 5, 9, 9, 9, 9], [3]])
def test_pipeline_matches_reference_forward(tiny_bundle, ort_engine, frames, ids) -> None:
    scores = ort_engine.score(TINY_INSTRUCTION, ids)
    ref = reference_forward(tiny_bundle, [frames[i] for i in ids], TINY_INSTRUCTION)
    assert isinstance(scores, Scores) and scores.frame_ids == tuple(ids)
    assert scores.progress_logits.shape == (len(ids), 10)
    np.testing.assert_allclose(scores.progress_logits, ref["progress_logits"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(scores.success_logits, ref["success_logits"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(scores.progress, expected_progress_np(ref["progress_logits"]), atol=PROB_ATOL)
    np.testing.assert_allclose(scores.success_probability, sigmoid_np(ref["success_logits"]), atol=PROB_ATOL)
    assert np.all((scores.progress >= 0) & (scores.progress <= 1))
    assert scores.inference_time > 0


def test_torch_backend_matches_onnxruntime(tiny_bundle, ort_engine, frames) -> None:
    runtime = TorchRuntime(tiny_bundle.model, tiny_bundle.bundle.manifest.frame.grid_thw, "cpu")
    engine = RewardEngine(tiny_bundle.bundle, runtime=runtime)
    assert engine.backend_name == "torch:cpu"
    for i in (1, 4, 6, 8):
        engine.add_frame(i, frames[i])
    a = engine.score(TINY_INSTRUCTION, [1, 4, 6, 8])
    b = ort_engine.score(TINY_INSTRUCTION, [1, 4, 6, 8])
    np.testing.assert_allclose(a.progress_logits, b.progress_logits, atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(a.success_logits, b.success_logits, atol=LOGIT_ATOL, rtol=0)


def test_torch_backend_from_the_bundle_checkpoint(tiny_bundle, ort_engine, frames) -> None:
    engine = RewardEngine(tiny_bundle.bundle, backend="torch", device="cpu")
    for i in range(3):
        engine.add_frame(i, frames[i])
    np.testing.assert_allclose(engine.score(TINY_INSTRUCTION, [0, 1, 2]).progress_logits,
                               ort_engine.score(TINY_INSTRUCTION, [0, 1, 2]).progress_logits, atol=LOGIT_ATOL, rtol=0)


def test_auto_backend_without_gpu_is_onnxruntime(tiny_bundle) -> None:
    assert create_runtime(tiny_bundle.bundle, "auto", intra_op_threads=1).backend_name.startswith("onnxruntime:")


def test_preference_matches_reference(tiny_bundle, ort_engine, frames) -> None:
    a, b = [0, 2, 4, 6], [1, 3, 5, 7]
    p = ort_engine.preference(TINY_INSTRUCTION, a, b)
    m = tiny_bundle.bundle.manifest
    prep = FramePreprocessor(m.frame.height, m.frame.width)
    layout = PromptBuilder(tiny_bundle.tokenizer).preference(TINY_INSTRUCTION, [m.frame.grid_thw] * 4,
                                                             [m.frame.grid_thw] * 4)
    pixels = torch.from_numpy(np.concatenate([prep(frames[i]) for i in a + b]))
    with torch.no_grad():
        ref = tiny_bundle.model.forward(
            torch.from_numpy(layout.input_ids), pixels, torch.from_numpy(layout.image_grid_thw),
            torch.from_numpy(layout.mm_token_type_ids), torch.from_numpy(layout.prog_positions),
            torch.from_numpy(layout.pref_position),
        )
    assert 0.0 < p < 1.0
    assert p == pytest.approx(float(torch.sigmoid(ref["preference_logit"])[0]), abs=PROB_ATOL)


def test_causal_a_frame_does_not_see_later_frames(ort_engine) -> None:
    short = ort_engine.score(TINY_INSTRUCTION, [0, 1, 2])
    longer = ort_engine.score(TINY_INSTRUCTION, [0, 1, 2, 5, 7, 9])
    np.testing.assert_allclose(longer.progress_logits[:3], short.progress_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(longer.success_logits[:3], short.success_logits, atol=1e-5, rtol=0)
    # while a different earlier frame does change what follows
    other = ort_engine.score(TINY_INSTRUCTION, [3, 1, 2])
    assert np.abs(other.progress_logits[1:] - short.progress_logits[1:]).max() > 1e-4


def test_cached_features_equal_re_encoding(tiny_bundle, ort_engine, frames) -> None:
    before = ort_engine.score(TINY_INSTRUCTION, [4, 5])
    ort_engine.add_frame(5, frames[5])  # re-adding the same image under the same id: same features
    after = ort_engine.score(TINY_INSTRUCTION, [4, 5])
    np.testing.assert_array_equal(before.progress_logits, after.progress_logits)


def test_bad_calls_raise_clear_errors(ort_engine) -> None:
    with pytest.raises(UnknownFrameError, match=r"1 frame id\(s\) in frame_ids are not cached.*'nope'"):
        ort_engine.score(TINY_INSTRUCTION, [0, "nope"])
    with pytest.raises(ValueError, match="instruction is empty"):
        ort_engine.score("   ", [0])
    with pytest.raises(TypeError, match="instruction must be a string"):
        ort_engine.score(None, [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frame_ids is empty"):
        ort_engine.score(TINY_INSTRUCTION, [])
    with pytest.raises(ValueError, match="at most 8 per prompt"):
        ort_engine.score(TINY_INSTRUCTION, list(range(9)))
    with pytest.raises(ValueError, match="above this bundle's maximum"):
        ort_engine.score("pick up the block " * 60, [0])
    with pytest.raises(ValueError, match="uint8"):
        ort_engine.add_frame("float", np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="hashable"):
        ort_engine.add_frame(["list"], np.zeros((8, 8, 3), np.uint8))


def _longest_that_fits(fits) -> tuple[str, str]:
    """(the longest "pick up the block ..." instruction ``fits`` accepts, the next one, which it refuses)."""
    n = 1
    while fits(" ".join(["pick up the block"] * n)):
        n += 1
    return " ".join(["pick up the block"] * (n - 1)), " ".join(["pick up the block"] * n)


def test_check_instruction_refuses_exactly_what_the_bundle_tokenizer_cannot_fit(tiny_bundle, ort_engine,
                                                                               monkeypatch) -> None:
    """The limit is the bundle's own: its tokenizer, its prompt, its maximum length (issue 11 item 2)."""
    from robometer_ros.session import ScoringSession, SessionConfig

    m = tiny_bundle.bundle.manifest
    builder = PromptBuilder(tiny_bundle.tokenizer)  # measured independently of the engine's builder
    grids = [m.frame.grid_thw] * ort_engine.num_frames
    fits, too_long = _longest_that_fits(lambda text: builder.progress(text, grids).seq_len <= m.sequence.max_length)
    ort_engine.check_instruction(fits)
    with pytest.raises(ValueError, match="above this bundle's"):
        ort_engine.check_instruction(too_long)

    session = ScoringSession(ort_engine, SessionConfig())
    started = session.start(fits).started
    with pytest.raises(ValueError, match="above this bundle's"):
        session.start(too_long)
    assert session.episode.episode_id == started.episode_id and session.episode.instruction == fits

    class NoTokenizing:
        def progress(self, *args, **kwargs):
            raise AssertionError("a 100 KB instruction must be refused before it is tokenized")

    monkeypatch.setattr(ort_engine, "prompts", NoTokenizing())  # the room was measured above
    with pytest.raises(ValueError, match="instruction of 100000 characters cannot fit this bundle's prompt"):
        ort_engine.check_instruction("x" * 100_000)


def test_a_bundle_for_more_frames_than_it_scores_refuses_what_its_prefix_parts_cannot_take(tmp_path) -> None:
    """max_frames > num_frames gives the full prompt more room than the prefix parts' profile (TensorRT's
    limit): an instruction the full prompt takes but the prefix does not is refused on arrival, not left to
    fail every step."""
    from fixtures_bundle import build_tiny_bundle

    tiny = build_tiny_bundle(tmp_path / "bundle", max_frames=16)
    m = tiny.bundle.manifest
    engine = RewardEngine(tiny.bundle, backend="onnxruntime", intra_op_threads=1)
    assert engine.prefix_reuse and m.sequence.max_frames > engine.num_frames
    builder = PromptBuilder(tiny.tokenizer)

    def prefix_length(text: str) -> int:
        from robometer_ros.model.prompt import split_after_first_frame

        return split_after_first_frame(builder.progress(text, [m.frame.grid_thw])).prefix_length

    fits, too_long = _longest_that_fits(lambda text: prefix_length(text) <= m.prefix.max_length)
    full = builder.progress(too_long, [m.frame.grid_thw] * engine.num_frames).seq_len
    assert full <= m.sequence.max_length  # the full prompt alone would have let it through
    engine.check_instruction(fits)
    with pytest.raises(ValueError, match="above this bundle's prefix maximum"):
        engine.check_instruction(too_long)


def test_warmup_leaves_the_cache_alone(ort_engine) -> None:
    before = ort_engine.cached_frame_ids()
    assert ort_engine.warmup() > 0
    assert ort_engine.cached_frame_ids() == before


def test_forget_and_bounded_cache(tiny_bundle, frames) -> None:
    engine = RewardEngine(tiny_bundle.bundle, backend="onnxruntime", intra_op_threads=1, max_cached_frames=3)
    for i in range(5):
        engine.add_frame(i, frames[i])
    assert engine.cached_frame_ids() == [2, 3, 4] and len(engine) == 3
    per_frame = 6 * 64 * 4 * 2  # tokens x hidden x float32 x (visual + 1 deepstack layer)
    assert engine.cache_nbytes == 3 * per_frame
    engine.forget([3, 99])
    assert 3 not in engine and engine.cache_nbytes == 2 * per_frame
    with pytest.raises(UnknownFrameError):
        engine.score(TINY_INSTRUCTION, [2, 3])
    engine.clear()
    assert len(engine) == 0 and engine.cache_nbytes == 0


class _NaNRuntime:
    """Wraps a runtime and poisons the language outputs."""

    def __init__(self, inner) -> None:
        self.inner, self.backend_name = inner, "nan-test"

    def encode_frame(self, pixel_values):
        return self.inner.encode_frame(pixel_values)

    def run_language(self, inputs, frames) -> HeadOutputs:
        out = self.inner.run_language(inputs, frames)
        out.success_logits[0] = np.nan
        return out

    def close(self) -> None:
        pass


def test_non_finite_outputs_raise(tiny_bundle, frames) -> None:
    inner = create_runtime(tiny_bundle.bundle, "onnxruntime", intra_op_threads=1)
    engine = RewardEngine(tiny_bundle.bundle, runtime=_NaNRuntime(inner))
    engine.add_frame(0, frames[0])
    with pytest.raises(ModelOutputError, match="non-finite values in success_logits"):
        engine.score(TINY_INSTRUCTION, [0])


def test_one_producer_and_one_scorer_thread(tiny_bundle, frames) -> None:
    from robometer_ros.episode import subsample_indices

    engine = RewardEngine(tiny_bundle.bundle, backend="onnxruntime", intra_op_threads=1)
    total = 30
    added = threading.Event()
    errors: list[BaseException] = []
    results: dict[int, np.ndarray] = {}
    count = [0]
    lock = threading.Lock()

    def producer() -> None:
        try:
            for i in range(total):
                engine.add_frame(i, frames[i % len(frames)])
                with lock:
                    count[0] = i + 1
                if i >= 20:
                    engine.forget([i - 20])  # keep a window, as the node's FrameStore does
                added.set()
        except BaseException as exc:
            errors.append(exc)

    def scorer() -> None:
        try:
            added.wait(10)
            while True:
                with lock:
                    n = count[0]
                start = max(0, n - 20)
                ids = [start + k for k in subsample_indices(n - start, 8)]
                try:
                    results[n] = engine.score(TINY_INSTRUCTION, ids).progress
                except UnknownFrameError:
                    continue  # the window moved between reading n and scoring: retry with the new state
                if n == total:
                    return
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=producer), threading.Thread(target=scorer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert total in results and len(engine) == 20
    # the last concurrent result equals a quiet recomputation
    ids = [10 + k for k in subsample_indices(20, 8)]
    np.testing.assert_allclose(results[total], engine.score(TINY_INSTRUCTION, ids).progress, atol=1e-6)


def test_onnxruntime_path_never_imports_torch(tiny_bundle) -> None:
    """A robot may have no torch: the onnxruntime path (and the TensorRT modules) must not import it."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "import robometer_ros.engine.trt_runtime, robometer_ros.engine.tensorrt_build\n"
        "from robometer_ros.engine.reward_engine import RewardEngine\n"
        f"engine = RewardEngine({str(tiny_bundle.path)!r}, backend='auto', intra_op_threads=1)\n"
        "engine.add_frame(0, np.zeros((30, 40, 3), np.uint8))\n"
        "engine.score('open the drawer', [0])\n"
        "print(engine.backend_name, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["onnxruntime:CPUExecutionProvider", "False", "False"], out.stderr


def test_tensorrt_ep_profiles_cover_the_manifest_ranges(tiny_bundle) -> None:
    from robometer_ros.engine.ort_runtime import trt_ep_profile_options

    assert trt_ep_profile_options(tiny_bundle.bundle, "vision") == {}  # fixed shapes
    options = trt_ep_profile_options(tiny_bundle.bundle, "language")
    seq = tiny_bundle.bundle.manifest.sequence
    assert f"input_ids:1x{seq.min_length}" in options["trt_profile_min_shapes"].split(",")
    assert f"position_ids:3x1x{seq.max_length}" in options["trt_profile_max_shapes"].split(",")
    assert "visual_embeds:48x64" in options["trt_profile_opt_shapes"].split(",")
    assert "prog_positions:1" in options["trt_profile_min_shapes"].split(",")
    assert "pref_position" not in options["trt_profile_max_shapes"]


# ---------------------------------------------------------------------------------------------- prefix reuse
# prefix + suffix parts vs the plain language part, fp32 ORT on the tiny model: observed max |diff| ~3e-7
PREFIX_ATOL = 1e-5
ID_LISTS = [list(range(8)), [0, 0, 2, 5, 9, 9, 9, 9], [3], [0, 1], [5, 1, 1, 2]]


@pytest.fixture(scope="module")
def plain_engine(tiny_bundle, frames) -> RewardEngine:
    engine = RewardEngine(tiny_bundle.bundle, backend="onnxruntime", intra_op_threads=1, prefix_reuse=False)
    for i, image in enumerate(frames):
        engine.add_frame(i, image)
    return engine


def _assert_same_scores(a: Scores, b: Scores, atol: float = PREFIX_ATOL) -> None:
    assert a.frame_ids == b.frame_ids
    np.testing.assert_allclose(a.progress_logits, b.progress_logits, atol=atol, rtol=0)
    np.testing.assert_allclose(a.success_logits, b.success_logits, atol=atol, rtol=0)
    np.testing.assert_allclose(a.progress, b.progress, atol=atol, rtol=0)


@pytest.mark.parametrize("ids", ID_LISTS)
def test_prefix_reuse_equals_the_plain_language_part(ort_engine, plain_engine, ids) -> None:
    assert ort_engine.prefix_reuse and not plain_engine.prefix_reuse
    assert "language_suffix" not in plain_engine.runtime.providers_in_use
    _assert_same_scores(ort_engine.score(TINY_INSTRUCTION, ids), plain_engine.score(TINY_INSTRUCTION, ids))


def test_torch_prefix_reuse_equals_the_plain_language_part(tiny_bundle, plain_engine, frames) -> None:
    engine = RewardEngine(tiny_bundle.bundle, runtime=TorchRuntime(tiny_bundle.model, (1, 4, 6), "cpu"))
    assert engine.prefix_reuse
    for i, image in enumerate(frames):
        engine.add_frame(i, image)
    for ids in ID_LISTS:
        _assert_same_scores(engine.score(TINY_INSTRUCTION, ids), plain_engine.score(TINY_INSTRUCTION, ids),
                            atol=LOGIT_ATOL)  # torch vs ONNX Runtime (plain): the usual cross-backend tolerance


class _CountingRuntime:
    """Wraps a runtime and counts the prefix-part calls."""

    def __init__(self, inner) -> None:
        self.inner, self.backend_name = inner, "counting"
        self.supports_prefix = inner.supports_prefix
        self.prefix_calls = 0
        self.suffix_batches: list[int] = []

    def encode_frame(self, pixel_values):
        return self.inner.encode_frame(pixel_values)

    def run_language(self, inputs, frames):
        return self.inner.run_language(inputs, frames)

    def run_prefix(self, inputs, first):
        self.prefix_calls += 1
        return self.inner.run_prefix(inputs, first)

    def run_suffix(self, inputs, prefix, frames):
        self.suffix_batches.append(len(frames))
        return self.inner.run_suffix(inputs, prefix, frames)

    def close(self) -> None:
        pass


def test_prefix_is_computed_once_per_instruction_and_first_frame(tiny_bundle, plain_engine, frames) -> None:
    runtime = _CountingRuntime(create_runtime(tiny_bundle.bundle, "onnxruntime", intra_op_threads=1))
    engine = RewardEngine(tiny_bundle.bundle, runtime=runtime, max_cached_prefixes=2)
    for i, image in enumerate(frames):
        engine.add_frame(i, image)
    for ids in ([0, 1, 2], [0, 3, 4, 5], [0, 9]):
        engine.score(TINY_INSTRUCTION, ids)
    assert runtime.prefix_calls == 1 and engine.cached_prefixes() == [(TINY_INSTRUCTION, 0)]
    # keys + values x 2 layers x 2 kv heads x prefix tokens x head dim 16 x float32
    from robometer_ros.model.prompt import split_after_first_frame

    prefix_tokens = split_after_first_frame(engine.prompts.progress(TINY_INSTRUCTION, [(1, 4, 6)])).prefix_length
    assert engine.prefix_cache_nbytes == 2 * 2 * 2 * prefix_tokens * 16 * 4
    engine.score("close the microwave door", [0, 1])  # another instruction: another prefix
    assert runtime.prefix_calls == 2 and len(engine.cached_prefixes()) == 2
    engine.forget([0])  # the first frame is gone: so are its prefixes
    assert engine.cached_prefixes() == [] and engine.prefix_cache_nbytes == 0
    engine.score(TINY_INSTRUCTION, [1, 2])
    engine.score(TINY_INSTRUCTION, [2, 3])
    engine.score(TINY_INSTRUCTION, [3, 4])  # at most 2 kept, least recently used out
    assert engine.cached_prefixes() == [(TINY_INSTRUCTION, 2), (TINY_INSTRUCTION, 3)] and runtime.prefix_calls == 5
    engine.add_frame(3, frames[0])  # a new image under a cached first-frame id: its prefix must not be reused
    assert engine.cached_prefixes() == [(TINY_INSTRUCTION, 2)]
    replaced = engine.score(TINY_INSTRUCTION, [3, 4])
    assert runtime.prefix_calls == 6
    # frame 3 now holds frame 0's image: the same scores as [0, 4]
    np.testing.assert_allclose(replaced.progress_logits, plain_engine.score(TINY_INSTRUCTION, [0, 4]).progress_logits,
                               atol=PREFIX_ATOL, rtol=0)
    engine.clear()
    assert engine.cached_prefixes() == [] and len(engine) == 0


def test_prefix_of_an_evicted_first_frame_is_dropped(tiny_bundle, frames) -> None:
    engine = RewardEngine(tiny_bundle.bundle, backend="onnxruntime", intra_op_threads=1, max_cached_frames=3)
    for i in range(3):
        engine.add_frame(i, frames[i])
    engine.score(TINY_INSTRUCTION, [0, 1, 2])
    assert engine.cached_prefixes() == [(TINY_INSTRUCTION, 0)]
    engine.add_frame(3, frames[3])  # evicts frame 0
    assert engine.cached_prefixes() == [] and 0 not in engine


def test_score_batch_equals_one_at_a_time(ort_engine, plain_engine) -> None:
    from robometer_ros.episode import subsample_indices

    # an offline replay of an episode of 10 frames (first frame shared), plus lists with other first frames
    lists = [subsample_indices(t + 1, 8) for t in range(10)] + [[4, 5, 6, 7, 8, 9, 9, 9], [1] * 8]
    for engine in (ort_engine, plain_engine):
        batched = engine.score_batch(TINY_INSTRUCTION, lists, batch_size=3)
        assert len(batched) == len(lists)
        for ids, scores in zip(lists, batched):
            _assert_same_scores(scores, plain_engine.score(TINY_INSTRUCTION, ids))
    assert ort_engine.score_batch(TINY_INSTRUCTION, []) == []
    with pytest.raises(ValueError, match="frame lists of one length"):
        ort_engine.score_batch(TINY_INSTRUCTION, [[0, 1], [0, 1, 2]])
    with pytest.raises(UnknownFrameError, match=r"frame_id_lists\[1\]"):
        ort_engine.score_batch(TINY_INSTRUCTION, [[0, 1], [0, "nope"]])


def test_score_batch_stacks_prompts_that_share_a_prefix(tiny_bundle, frames) -> None:
    runtime = _CountingRuntime(create_runtime(tiny_bundle.bundle, "onnxruntime", intra_op_threads=1))
    engine = RewardEngine(tiny_bundle.bundle, runtime=runtime)
    for i, image in enumerate(frames):
        engine.add_frame(i, image)
    lists = [[0, i, i + 1] for i in range(1, 8)] + [[2, 3, 4]]
    engine.score_batch(TINY_INSTRUCTION, lists, batch_size=4)
    assert runtime.prefix_calls == 2  # first frames 0 and 2
    assert runtime.suffix_batches == [4, 3, 1]
    # a runtime without a device preference: the bundle's max batch (16), one call per prefix
    assert engine.default_batch_size == 16
    engine.score_batch(TINY_INSTRUCTION, lists)
    assert runtime.suffix_batches[3:] == [7, 1] and runtime.prefix_calls == 2  # prefixes were cached
    # ONNX Runtime on the CPU prefers a few prompts per call
    assert RewardEngine(tiny_bundle.bundle, runtime=runtime.inner).default_batch_size == 4
