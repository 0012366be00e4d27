"""Hand-derived checks of rlcore.loss (values computed on paper; tolerances stated per assert)."""

from __future__ import annotations

import math

import pytest
import torch

from rlcore.config import GRPOConfig
from rlcore.loss import (
    LOSS_TYPES,
    LossSettings,
    aggregate,
    grpo_loss,
    high_entropy_mask,
    importance_sampling_correction,
    log_importance_weights,
    off_policy_sequence_mask,
    sampler_mismatch,
)

TOL = 1e-12  # float64 hand computations


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def _run(current, old, advantages, mask=None, ref=None, **settings):
    current = _t(current).requires_grad_(True)
    mask = torch.ones_like(current, dtype=torch.long) if mask is None else torch.tensor(mask)
    settings.setdefault("loss_type", "grpo")
    loss, metrics = grpo_loss(current, None if old is None else _t(old), None if ref is None else _t(ref),
                              _t(advantages), mask, settings=LossSettings(**settings),
                              num_items_in_batch=int(mask.sum()))
    (grad,) = torch.autograd.grad(loss, current)
    return float(loss.detach()), grad, metrics


# ------------------------------------------------------------------------------------------------ one token
def test_one_token_positive_advantage_clipped():
    # r = 0.6/0.5 = 1.2 > 1 + 0.1, A = 1: loss = -min(1.2, 1.1) = -1.1, the clip removes the gradient
    loss, grad, metrics = _run([[math.log(0.6)]], [[math.log(0.5)]], [1.0], epsilon=0.1)
    assert loss == pytest.approx(-1.1, abs=TOL)
    assert float(grad) == 0.0
    assert float(metrics["clip_ratio_high"]) == 1.0 and float(metrics["clip_ratio_low"]) == 0.0


def test_one_token_negative_advantage_unclipped_then_delta():
    # A = -1: loss = -min(-1.2, -1.1) = 1.2 = r; d r / d logp = r = 1.2
    loss, grad, metrics = _run([[math.log(0.6)]], [[math.log(0.5)]], [-1.0], epsilon=0.1)
    assert loss == pytest.approx(1.2, abs=TOL)
    assert float(grad) == pytest.approx(1.2, abs=TOL)
    assert float(metrics["clip_ratio_region"]) == 0.0
    # delta = 1.15 caps the ratio: loss = -min(-1.15, -1.1) = 1.15, constant in logp
    loss, grad, _ = _run([[math.log(0.6)]], [[math.log(0.5)]], [-1.0], epsilon=0.1, delta=1.15)
    assert loss == pytest.approx(1.15, abs=TOL)
    assert float(grad) == 0.0


def test_epsilon_high_is_asymmetric():
    # r = 1.25: clipped with epsilon_high = 0.2 (loss -1.2), not with epsilon_high = 0.28 (loss -1.25, grad -1.25)
    args = ([[math.log(1.25)]], [[0.0]], [1.0])
    assert _run(*args, epsilon=0.2)[0] == pytest.approx(-1.2, abs=TOL)
    loss, grad, _ = _run(*args, epsilon=0.2, epsilon_high=0.28)
    assert loss == pytest.approx(-1.25, abs=TOL) and float(grad) == pytest.approx(-1.25, abs=TOL)


def test_on_policy_ratio_is_one_with_policy_gradient():
    # old None: r = exp(logp - sg(logp)) = 1, d loss / d logp_t = -A / L_i (grpo: per-sequence mean, batch mean)
    loss, grad, metrics = _run([[-1.0, -2.0, -0.5]], None, [2.0], mask=[[1, 1, 0]])
    assert loss == pytest.approx(-2.0, abs=TOL)
    torch.testing.assert_close(grad, _t([[-1.0, -1.0, 0.0]]), rtol=0, atol=TOL)
    assert float(metrics["importance_ratio_mean"]) == 1.0


def test_k3_kl_and_bias_correction_gradient():
    # logp = log .6, ref = log .4, on-policy, A = 0: KL_t = 2/3 + log 1.5 - 1
    logp, ref = math.log(0.6), math.log(0.4)
    kl = 2 / 3 + math.log(1.5) - 1
    loss, grad, metrics = _run([[logp]], None, [0.0], ref=[[ref]], beta=0.1)
    assert loss == pytest.approx(0.1 * kl, abs=TOL)
    assert float(metrics["kl"]) == pytest.approx(kl, abs=TOL)
    # with the ratio kept in the graph: d(r·k3)/dlogp = k3 + 1 - ref/p = logp - ref, the true KL gradient
    assert float(grad) == pytest.approx(0.1 * math.log(1.5), abs=TOL)
    # without the correction: d k3 / dlogp = 1 - ref/p = 1/3
    _, grad, _ = _run([[logp]], None, [0.0], ref=[[ref]], beta=0.1, use_bias_correction_kl=False)
    assert float(grad) == pytest.approx(0.1 / 3, abs=TOL)


# ------------------------------------------------------------------------------------------------ GSPO
def test_sequence_ratio_is_exp_of_mean_log_ratio():
    current = _t([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    old = _t([[-1.3, -1.9, 5.0], [-0.2, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    log_s = log_importance_weights(current, old, mask, "sequence")
    expected = _t([[(0.3 - 0.1) / 2], [(-0.3 + 0.0 - 9.0) / 3]])
    torch.testing.assert_close(log_s, expected, rtol=0, atol=TOL)
    # fully masked row: ratio 1, no division by zero
    assert float(log_importance_weights(current, old, torch.zeros_like(mask), "sequence")[0]) == 0.0


def test_gspo_gradient_is_shared_over_tokens():
    # s = exp(mean(0.05, -0.05)) = 1 (unclipped), A = 1: loss = -s, d/dlogp_t = -s / 2 on active tokens
    loss, grad, _ = _run([[-1.0, -2.0, -7.0]], [[-1.05, -1.95, 0.0]], [1.0], mask=[[1, 1, 0]],
                         importance_sampling_level="sequence")
    assert loss == pytest.approx(-1.0, abs=TOL)
    torch.testing.assert_close(grad, _t([[-0.5, -0.5, 0.0]]), rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------------------ aggregation
def test_aggregation_by_hand():
    per_token = _t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # grpo: mean(6/3, 4/1) = 3; bnpo: 10/4; dr_grpo: 10/(2*5); dapo: 10/20; luspo: mean(6, 4) = 5
    expected = {"grpo": 3.0, "sapo": 3.0, "bnpo": 2.5, "dr_grpo": 1.0, "dapo": 0.5, "cispo": 0.5, "luspo": 5.0}
    for loss_type, value in expected.items():
        got = aggregate(per_token, mask, loss_type, num_items_in_batch=20, max_completion_length=5)
        assert float(got) == pytest.approx(value, abs=TOL), loss_type
    # gradient accumulation divides all but the token-sum normalised types (those are normalised by the window)
    assert float(aggregate(per_token, mask, "grpo", gradient_accumulation_steps=4)) == pytest.approx(0.75)
    assert float(aggregate(per_token, mask, "dapo", num_items_in_batch=20, gradient_accumulation_steps=4)) == 0.5


def test_dapo_micro_batches_sum_to_the_whole_batch():
    g = torch.Generator().manual_seed(0)
    current = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    old = current + 0.2 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    advantages = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    settings = LossSettings(loss_type="dapo")
    total = int(mask.sum())  # 11 tokens over the whole accumulated batch

    def grads(rows, items):
        x = current.clone().requires_grad_(True)
        loss, _ = grpo_loss(x[rows], old[rows], None, advantages[rows], mask[rows], settings=settings,
                            num_items_in_batch=items)
        loss.backward()
        return loss, x.grad

    whole_loss, whole_grad = grads(slice(0, 4), total)
    first_loss, first_grad = grads(slice(0, 2), total)
    second_loss, second_grad = grads(slice(2, 4), total)
    torch.testing.assert_close(first_loss + second_loss, whole_loss, rtol=0, atol=TOL)
    torch.testing.assert_close(first_grad + second_grad, whole_grad, rtol=0, atol=TOL)
    # and the token-sum itself: each active token weighs 1/11 of its surrogate
    x = current.clone().requires_grad_(True)
    ratio = torch.exp(x - old)
    by_hand = (-torch.min(ratio * advantages[:, None], ratio.clamp(0.8, 1.2) * advantages[:, None]) * mask).sum()
    torch.testing.assert_close(whole_loss, by_hand.detach() / 11, rtol=0, atol=TOL)


def test_grpo_accumulated_micro_batches_average():
    current = _t([[-1.0, -2.0], [-0.5, -0.7]])
    mask = torch.tensor([[1, 1], [1, 0]])
    settings = LossSettings(loss_type="grpo")
    full, _ = grpo_loss(current, None, None, _t([1.0, -2.0]), mask, settings=settings)
    halves = [grpo_loss(current[i:i + 1], None, None, _t([[1.0], [-2.0]][i]), mask[i:i + 1], settings=settings,
                        gradient_accumulation_steps=2)[0] for i in range(2)]
    assert float(sum(halves)) == pytest.approx(float(full), abs=TOL)


def test_cispo_keeps_a_clipped_reinforce_gradient():
    # r = (2.0, 1.0), cap 1.5: d loss / d logp_t = -min(r_t, 1.5) * A / N, N = 2 tokens
    loss, grad, metrics = _run([[math.log(2.0), 0.0]], [[0.0, 0.0]], [1.0], loss_type="cispo", epsilon_high=1.5)
    torch.testing.assert_close(grad, _t([[-1.5 / 2, -1.0 / 2]]), rtol=0, atol=TOL)
    assert loss == pytest.approx(-(1.5 * math.log(2.0) + 0.0) / 2, abs=TOL)
    assert float(metrics["cispo_clip_ratio"]) == 0.5


def test_sapo_on_policy_gradient_equals_unclipped_objective():
    # the gate 4/τ σ(τ(r-1)) has value 2/τ and slope 1 at r = 1
    loss, grad, _ = _run([[-1.0, -2.0]], None, [1.5], loss_type="sapo", sapo_temperature_pos=2.0)
    assert loss == pytest.approx(-1.5 * 2 / 2.0, abs=TOL)
    torch.testing.assert_close(grad, _t([[-0.75, -0.75]]), rtol=0, atol=TOL)
    _, grad, _ = _run([[-1.0, -2.0]], None, [-1.5], loss_type="sapo", sapo_temperature_neg=3.0)
    torch.testing.assert_close(grad, _t([[0.75, 0.75]]), rtol=0, atol=TOL)


def test_clip_fractions():
    # tokens: (r 1.5, A>0) high; (r 0.5, A<0) low; (r 1.5, A<0) neither; (r 1, A>0) neither
    current = [[math.log(1.5), math.log(0.5)], [math.log(1.5), 0.0]]
    _, _, metrics = _run(current, [[0.0, 0.0], [0.0, 0.0]], [[1.0, -1.0], [-1.0, 1.0]], loss_type="dapo")
    assert float(metrics["clip_ratio_high"]) == 0.25
    assert float(metrics["clip_ratio_low"]) == 0.25
    assert float(metrics["clip_ratio_region"]) == 0.5
    assert float(metrics["importance_ratio_max"]) == pytest.approx(1.5, abs=TOL)
    assert float(metrics["importance_ratio_mean"]) == pytest.approx((1.5 + 0.5 + 1.5 + 1.0) / 4, abs=TOL)


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_completion_truncated_gives_zero_not_nan(loss_type):
    level = "sequence" if loss_type == "luspo" else "token"
    current = _t([[-1.0, -2.0], [-0.5, -0.1]]).requires_grad_(True)
    settings = LossSettings(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                            mask_truncated_completions=True, top_entropy_quantile=0.5, off_policy_mask_threshold=0.1)
    loss, metrics = grpo_loss(current, current.detach() + 0.1, current.detach() - 0.2, _t([1.0, -1.0]),
                              torch.ones(2, 2, dtype=torch.long), settings=settings, entropies=_t([[1, 2], [3, 4]]),
                              truncated=torch.tensor([True, True]), num_items_in_batch=0,
                              sampling_per_token_logps=current.detach())
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert float(current.grad.abs().sum()) == 0.0
    assert all(bool(torch.isfinite(v)) for v in metrics.values()), metrics


def test_mask_truncated_completions_drops_only_truncated_rows():
    current = _t([[-1.0, -2.0], [-0.5, -0.1]]).requires_grad_(True)
    settings = LossSettings(loss_type="bnpo", mask_truncated_completions=True)
    loss, _ = grpo_loss(current, None, None, _t([1.0, 4.0]), torch.ones(2, 2, dtype=torch.long),
                        settings=settings, truncated=torch.tensor([False, True]))
    loss.backward()
    # only row 0 is active: loss = -(1 + 1) / 2 tokens
    assert float(loss.detach()) == pytest.approx(-1.0, abs=TOL)
    torch.testing.assert_close(current.grad, _t([[-0.5, -0.5], [0.0, 0.0]]), rtol=0, atol=TOL)


def test_high_entropy_mask_keeps_the_top_quantile():
    entropies = _t([[0.1, 0.9, 0.5], [0.3, 9.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # active: 0.1 0.9 0.5 0.3; 9.0 is padding
    # quantile 0.5 of (0.1, 0.3, 0.5, 0.9) = 0.4: keep 0.9 and 0.5
    keep = high_entropy_mask(entropies, mask, 0.5)
    assert keep.tolist() == [[False, True, True], [False, False, False]]
    assert high_entropy_mask(entropies, mask, 1.0)[mask.bool()].all()
    assert not high_entropy_mask(entropies, torch.zeros_like(mask), 0.5).any()


def test_off_policy_mask_drops_drifted_negative_sequences():
    current = _t([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    sampling = _t([[-0.5, -0.5], [-0.5, -0.5], [-1.0, -1.0], [-0.5, -0.5]])  # drift: 0.5, 0.5, 0, 0.5
    keep = off_policy_sequence_mask(_t([-1.0, 1.0, -1.0, 0.0]), current, sampling, torch.ones(4, 2), 0.1)
    # negative + drifted: dropped; positive: kept; no drift: kept; zero advantage counts as non-negative: kept
    assert keep.flatten().tolist() == [0.0, 1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------------ engine IS
def test_importance_sampling_correction_modes_by_hand():
    old = _t([[0.0, 0.0, 0.0]])
    sampling = _t([[-1.0, 0.5, float("nan")]])  # token ratios e, e^-0.5, (NaN → 1)
    mask = torch.tensor([[1, 1, 1]])
    w, _ = importance_sampling_correction(old, sampling, mask, mode="token_truncate", clip_min=0.7, clip_max=2.0)
    torch.testing.assert_close(w, _t([[2.0, 0.7, 1.0]]), rtol=0, atol=TOL)
    w, metrics = importance_sampling_correction(old, sampling, mask, mode="token_mask", clip_min=0.7, clip_max=2.0)
    torch.testing.assert_close(w, _t([[0.0, 0.0, 1.0]]), rtol=0, atol=TOL)
    assert float(metrics["fraction_corrected"]) == pytest.approx(2 / 3, abs=TOL)
    # sequence: exp(1 - 0.5) = e^0.5 ≈ 1.65
    w, _ = importance_sampling_correction(old, sampling, mask, mode="sequence_truncate", clip_max=1.5)
    torch.testing.assert_close(w, _t([[1.5]]), rtol=0, atol=TOL)
    w, _ = importance_sampling_correction(old, sampling, mask, mode="sequence_mask", clip_max=3.0)
    torch.testing.assert_close(w, _t([[math.exp(0.5)]]), rtol=0, atol=TOL)
    w, _ = importance_sampling_correction(old, sampling, mask, mode="sequence_mask", clip_max=1.6)
    assert float(w) == 0.0
    # mismatch metrics ignore the unscorable token: |Δ| = (1, 0.5)
    assert float(metrics["logp_diff_mean"]) == pytest.approx(0.75, abs=TOL)
    assert float(metrics["kl"]) == pytest.approx(((math.e - 2) + (math.exp(-0.5) - 0.5)) / 2, abs=TOL)


def test_importance_weights_multiply_the_policy_term_only():
    current = _t([[-1.0, -2.0]]).requires_grad_(True)
    settings = LossSettings(loss_type="dapo", beta=0.5)
    ref = _t([[-1.0, -2.0]])  # KL = 0 with gradient 0 at ref = logp
    loss, _ = grpo_loss(current, None, ref, _t([1.0]), torch.ones(1, 2), settings=settings,
                        importance_weights=_t([[0.5, 2.0]]), num_items_in_batch=2)
    loss.backward()
    torch.testing.assert_close(current.grad, _t([[-0.25, -1.0]]), rtol=0, atol=TOL)


def test_sampler_mismatch_metrics_in_loss():
    current = _t([[-1.0, -2.0, -3.0]])
    sampling = _t([[-1.5, -2.0, 0.0]])
    _, loss_metrics = grpo_loss(current, None, None, _t([1.0]), torch.tensor([[1, 1, 0]]),
                                settings=LossSettings(loss_type="grpo"), sampling_per_token_logps=sampling)
    metrics = sampler_mismatch(current, sampling, torch.tensor([[1, 1, 0]]))
    for key in ("logp_diff_mean", "logp_diff_max", "kl"):
        assert float(loss_metrics[f"sampler_{key}"]) == float(metrics[key])
    assert float(metrics["logp_diff_mean"]) == pytest.approx(0.25, abs=TOL)
    assert float(metrics["logp_diff_max"]) == pytest.approx(0.5, abs=TOL)
    assert float(metrics["kl"]) == pytest.approx((math.exp(0.5) - 1.5) / 2, abs=TOL)


# ------------------------------------------------------------------------------------------------ settings, errors
def test_settings_from_config():
    config = GRPOConfig(loss_type="sapo", beta=0.04, epsilon=0.1, epsilon_high=0.3, delta=1.5,
                        importance_sampling_level="sequence", max_completion_length=64, num_generations=4,
                        per_device_train_batch_size=4, top_entropy_quantile=0.2, mask_truncated_completions=True,
                        off_policy_mask_threshold=0.3, sapo_temperature_neg=2.0, use_bias_correction_kl=False)
    s = LossSettings.from_config(config)
    assert (s.loss_type, s.beta, s.epsilon_low, s.epsilon_upper, s.delta, s.importance_sampling_level,
            s.max_completion_length, s.top_entropy_quantile, s.mask_truncated_completions,
            s.off_policy_mask_threshold, s.sapo_temperature_neg, s.use_bias_correction_kl) == (
        "sapo", 0.04, 0.1, 0.3, 1.5, "sequence", 64, 0.2, True, 0.3, 2.0, False)
    assert LossSettings(epsilon=0.3).epsilon_upper == 0.3


@pytest.mark.parametrize("changes,word", [
    ({"loss_type": "ppo"}, "loss_type"),
    ({"importance_sampling_level": "word"}, "importance_sampling_level"),
    ({"loss_type": "luspo"}, "importance_sampling_level"),
    ({"delta": 0.5}, "delta"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
    ({"epsilon": 0.0}, "epsilon"),
])
def test_bad_settings_name_the_field(changes, word):
    with pytest.raises(ValueError, match=word):
        LossSettings(**changes)


def test_bad_inputs_name_the_argument():
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    adv = torch.zeros(2)
    s = LossSettings(loss_type="grpo")
    cases = [
        (dict(per_token_logps=torch.zeros(2, 3, 1)), "per_token_logps"),
        (dict(completion_mask=torch.ones(2, 4)), "completion_mask"),
        (dict(old_per_token_logps=torch.zeros(3, 3)), "old_per_token_logps"),
        (dict(advantages=torch.zeros(3)), "advantages"),
        (dict(importance_weights=torch.ones(2, 2)), "importance_weights"),
        (dict(sampling_per_token_logps=torch.zeros(1, 3)), "sampling_per_token_logps"),
        (dict(settings=LossSettings(beta=0.1)), "ref_per_token_logps"),
        (dict(settings=LossSettings(loss_type="dapo")), "num_items_in_batch"),
        (dict(settings=LossSettings(top_entropy_quantile=0.5)), "entropies"),
        (dict(settings=LossSettings(mask_truncated_completions=True)), "truncated"),
        (dict(settings=LossSettings(mask_truncated_completions=True), truncated=torch.zeros(3, dtype=torch.bool)),
         "truncated"),
        (dict(settings={"loss_type": "grpo"}), "settings"),
    ]
    for change, word in cases:
        args = dict(per_token_logps=x, old_per_token_logps=None, ref_per_token_logps=None, advantages=adv,
                    completion_mask=mask, settings=s)
        args.update(change)
        with pytest.raises(ValueError, match=word):
            grpo_loss(**args)
    with pytest.raises(ValueError, match="mode"):
        importance_sampling_correction(x, x, mask, mode="token_clip")
    with pytest.raises(ValueError, match="sampling_per_token_logps"):
        importance_sampling_correction(x, torch.zeros(2, 2), mask)
    with pytest.raises(ValueError, match="loss_type"):
        aggregate(x, mask, "ppo")
