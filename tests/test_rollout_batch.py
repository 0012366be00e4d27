"""RolloutBatch, the contract between making a batch and the loss: one loss mask, one weight shape, plain state."""

from __future__ import annotations

import io

import pytest
import torch

from rlcore.loss import LossSettings, grpo_loss, importance_sampling_correction
from rlcore.rollout import Rollout, StandbyStats
from rlcore.rollout_batch import RolloutBatch, RolloutTimings


def _rollouts() -> list[Rollout]:
    generator = torch.Generator().manual_seed(0)
    lengths, reasons = (3, 5, 1, 5), ("stop", "length", "stop", "length")
    return [Rollout(prompt_ids=list(range(1, 2 + i)), completion_ids=list(range(10, 10 + n)), text="",
                    logprobs=(-torch.rand(n, generator=generator)).tolist(), finish_reason=reason)
            for i, (n, reason) in enumerate(zip(lengths, reasons))]


def _batch(mask_truncated: bool) -> RolloutBatch:
    return RolloutBatch.from_rollouts(0, _rollouts(), torch.tensor([1.0, -0.5, 0.25, -1.0]), pad_token_id=0,
                                      device=torch.device("cpu"), mask_truncated_completions=mask_truncated)


def test_loss_mask_is_built_once_at_construction():
    batch = _batch(mask_truncated=True)
    expected = torch.tensor([[1, 1, 1, 0, 0], [0] * 5, [1, 0, 0, 0, 0], [0] * 5])  # rows 1 and 3 hit the length
    assert torch.equal(batch.loss_mask, expected)
    assert torch.equal(_batch(mask_truncated=False).loss_mask, batch.completion_mask)
    assert batch.active_tokens([0, 1, 2]) == 4
    with pytest.raises(ValueError, match="advantages has shape"):
        RolloutBatch.from_rollouts(0, _rollouts(), torch.zeros(3), 0, torch.device("cpu"))


@pytest.mark.parametrize("mode", ["sequence_mask", "token_truncate"])
def test_micro_batch_loss_equals_the_loss_on_full_tensors(mode):
    # The reference: grpo_loss given the raw completion mask, truncated flags and the weights in the shape
    # importance_sampling_correction returns ([N, 1] or [N, C]), as TRL's API takes them.
    batch = _batch(mask_truncated=True)
    old = batch.sampling_logps + 0.05 * torch.randn(batch.sampling_logps.shape, generator=torch.Generator()
                                                    .manual_seed(1))
    weights, _ = importance_sampling_correction(old, batch.sampling_logps, batch.loss_mask, mode=mode,
                                                clip_min=0.5, clip_max=1.02)
    batch.old_logps = old
    batch.set_importance_weights(weights)
    assert batch.is_weights.shape == batch.completion_ids.shape  # one shape whatever the mode
    rows = [0, 1, 2]
    micro = batch.micro_batch(rows)
    width = micro.width
    assert width == 5 and micro.loss_mask.shape == (3, 5)
    policy = (old[rows][:, :width] + 0.1).requires_grad_(True)
    settings = LossSettings(loss_type="grpo", mask_truncated_completions=True, beta=0.0)
    ours, _ = grpo_loss(policy, micro.old_logps, None, micro.advantages, micro.loss_mask,
                        settings=LossSettings(loss_type="grpo"), importance_weights=micro.is_weights)
    reference_weights = weights[rows] if weights.shape[1] == 1 else weights[rows][:, :width]
    reference, _ = grpo_loss(policy, old[rows][:, :width], None, batch.advantages[rows],
                             batch.completion_mask[rows][:, :width], settings=settings,
                             importance_weights=reference_weights, truncated=batch.truncated[rows])
    assert float(reference.detach()) != 0.0
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-7)
    (grad_ours,) = torch.autograd.grad(ours, policy)
    (grad_reference,) = torch.autograd.grad(reference, policy)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=0, atol=1e-7)


def test_state_is_plain_data_and_round_trips():
    batch = _batch(mask_truncated=False)
    batch.set_importance_weights(torch.rand(4, 1))
    batch.mismatch = {"logp_diff_mean": 0.1, "logp_diff_max": 0.3, "kl": 0.01}
    batch.timings = RolloutTimings(generate=1.5, standby=0.25, reward=0.5, reference=0.125,
                                   reward_by_function={"format": 0.5})
    batch.sleep = StandbyStats(seconds=0.04, freed_bytes=2**30, device_freed_bytes=2**30 - 5)
    batch.metrics = {"reward_mean": 0.5}
    buffer = io.BytesIO()
    torch.save(batch.to_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # nothing but tensors and plain containers
    restored = RolloutBatch.from_state(state, torch.device("cpu"))
    assert restored.timings == batch.timings and restored.sleep == batch.sleep and restored.wake == batch.wake
    assert restored.mismatch == batch.mismatch and restored.metrics == batch.metrics
    for name in ("prompt_ids", "completion_ids", "loss_mask", "is_weights", "advantages", "truncated"):
        assert torch.equal(getattr(restored, name), getattr(batch, name)), name


def test_timings_add_up():
    a = RolloutTimings(1.0, 0.5, 0.25, 0.125, {"x": 0.25})
    b = RolloutTimings(2.0, 0.5, 0.5, 0.0, {"x": 0.25, "y": 0.25})
    assert a.add(b) == RolloutTimings(3.0, 1.0, 0.75, 0.125, {"x": 0.5, "y": 0.25})
