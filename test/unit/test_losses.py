"""Loss values against numbers worked out by hand (ln values written out, not recomputed by the code)."""

from __future__ import annotations

import math

import pytest
import torch

from robometer_ros.training.recipe.losses import (
    LossWeights,
    preference_loss,
    progress_loss,
    robometer_loss,
    success_loss,
)

torch.set_num_threads(1)

LN2 = 0.6931471805599453
LN10 = 2.302585092994046
LN5_5 = 1.7047480922384253  # -ln(2/11)
LN11 = 2.3978952727983707  # -ln(1/11)
LN_1_PLUS_E = 1.3132616875182228  # ln(1 + e)
LN_1_PLUS_E2 = 2.1269280110429727  # ln(1 + e^2)


def _skewed_logits() -> torch.Tensor:
    """One frame whose softmax is 2/11 on bin 0 and 1/11 on each of the other 9 bins."""
    logits = torch.zeros(10)
    logits[0] = LN2
    return logits


def test_uniform_logits_give_ln10_over_frames() -> None:
    # CE = ln 10 for every frame whatever the target; masked mean ln 10, divided once more by T = 2.
    logits = torch.zeros(1, 2, 10)
    assert progress_loss(logits, [[0.0, 0.5]]).item() == pytest.approx(LN10 / 2, rel=1e-6)


def test_progress_two_hot_cross_entropy_by_hand() -> None:
    logits = torch.stack([_skewed_logits(), _skewed_logits()]).unsqueeze(0)  # [1, 2, 10]
    # frame 0: target 0 -> all mass on bin 0: CE = -ln(2/11) = ln 5.5
    # frame 1: target 1/18 -> b = 0.5: half on bin 0, half on bin 1: CE = 0.5 ln 5.5 + 0.5 ln 11
    expected = (LN5_5 + 0.5 * LN5_5 + 0.5 * LN11) / (2 * 2)  # sum(m CE) / (T * sum(m)), T = 2, sum(m) = 2
    assert progress_loss(logits, [[0.0, 1 / 18]]).item() == pytest.approx(expected, rel=1e-6)
    # frame mask drops frame 1: ln 5.5 / (2 * 1)
    loss = progress_loss(logits, [[0.0, 1 / 18]], frame_mask=[[1.0, 0.0]])
    assert loss.item() == pytest.approx(LN5_5 / 2, rel=1e-6)


def test_progress_sample_mask_ignores_masked_samples() -> None:
    good = torch.stack([_skewed_logits(), _skewed_logits()])
    wild = torch.full((2, 10), 1e4)
    wild[:, 9] = -1e4  # a huge CE if it counted
    logits = torch.stack([good, wild])  # [2, 2, 10]
    loss = progress_loss(logits, [[0.0, 0.0], [0.0, 0.0]], sample_mask=[1.0, 0.0])
    assert loss.item() == pytest.approx(2 * LN5_5 / (2 * 2), rel=1e-6)


def test_all_masked_progress_is_zero_with_a_graph() -> None:
    logits = torch.zeros(2, 8, 10, requires_grad=True)
    loss = progress_loss(logits, torch.zeros(2, 8), sample_mask=[0.0, 0.0])
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_success_bce_masked_mean_and_clamp() -> None:
    # bce(0, 1) = ln 2; bce(2, 0) = ln(1 + e^2); the third frame is masked out.
    loss = success_loss(torch.tensor([[0.0, 2.0, -3.0]]), [[1.0, 0.0, 0.0]], [[1.0, 1.0, 0.0]])
    assert loss.item() == pytest.approx((LN2 + LN_1_PLUS_E2) / 2, rel=1e-6)
    # A logit of 1000 on a 0 label is clamped to 50: bce = ln(1 + e^50) = 50 (to float precision).
    assert success_loss(torch.tensor([[1000.0]]), [[0.0]]).item() == pytest.approx(50.0, rel=1e-6)


def test_preference_bce_and_clamp() -> None:
    # labels 1: bce(0, 1) = ln 2, bce(-1, 1) = ln(1 + e)
    loss = preference_loss(torch.tensor([0.0, -1.0]), [1, 1])
    assert loss.item() == pytest.approx((LN2 + LN_1_PLUS_E) / 2, rel=1e-6)
    assert preference_loss(torch.tensor([-1000.0]), [1]).item() == pytest.approx(50.0, rel=1e-6)
    # label 0 on logit 1: bce = ln(1 + e)
    assert preference_loss(torch.tensor([[1.0]]), [0]).item() == pytest.approx(LN_1_PLUS_E, rel=1e-6)


def test_weighted_total_and_nan_term_becomes_zero() -> None:
    labels = {
        "progress_a": torch.zeros(1, 2),
        "progress_mask_a": torch.ones(1),
        "success_a": torch.tensor([[1.0, 0.0]]),
        "success_mask_a": torch.ones(1, 2),
        "preference_label": torch.ones(1),
    }
    progress_logits = torch.zeros(1, 2, 10)  # progress term ln 10 / 2
    success_logits = torch.zeros(1, 2)  # success term ln 2
    weights = LossWeights(progress=2.0, success=0.5, preference=3.0)
    terms = robometer_loss(labels, progress_logits, success_logits, torch.tensor([0.0]), weights)
    assert terms.progress.item() == pytest.approx(LN10 / 2, rel=1e-6)
    assert terms.success.item() == pytest.approx(LN2, rel=1e-6)
    assert terms.preference.item() == pytest.approx(LN2, rel=1e-6)
    assert terms.total.item() == pytest.approx(2.0 * LN10 / 2 + 0.5 * LN2 + 3.0 * LN2, rel=1e-6)

    nan_terms = robometer_loss(labels, progress_logits, success_logits, torch.tensor([math.nan]), weights)
    assert nan_terms.preference.item() == 0.0
    assert nan_terms.total.item() == pytest.approx(2.0 * LN10 / 2 + 0.5 * LN2, rel=1e-6)
    # progress-only batches have no preference term
    assert robometer_loss(labels, progress_logits, success_logits).preference.item() == 0.0


def test_gradient_flows_to_all_heads() -> None:
    progress_logits = torch.zeros(2, 8, 10, requires_grad=True)
    success_logits = torch.zeros(2, 8, requires_grad=True)
    preference_logits = torch.zeros(2, requires_grad=True)
    labels = {
        "progress_a": torch.linspace(0, 1, 8).repeat(2, 1),
        "progress_mask_a": torch.tensor([1.0, 0.0]),
        "success_a": torch.zeros(2, 8),
        "success_mask_a": torch.ones(2, 8),
        "preference_label": torch.tensor([1.0, 0.0]),
    }
    robometer_loss(labels, progress_logits, success_logits, preference_logits).total.backward()
    assert torch.count_nonzero(progress_logits.grad[0]) > 0
    assert torch.count_nonzero(progress_logits.grad[1]) == 0  # masked sample
    assert torch.count_nonzero(success_logits.grad) > 0
    assert preference_logits.grad[0] < 0 < preference_logits.grad[1]


def test_bad_shapes_and_weights_are_named() -> None:
    with pytest.raises(ValueError, match="target_progress"):
        progress_loss(torch.zeros(1, 2, 10), [[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="bins"):
        progress_loss(torch.zeros(2, 10), [[0.0, 0.0]])
    with pytest.raises(ValueError, match="unknown loss weights"):
        LossWeights.from_dict({"progres": 1.0})
