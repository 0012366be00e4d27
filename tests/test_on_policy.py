"""On-policy batches skip the separate old-log-prob pass: the training forward's own log-probs give the old policy,
the engine-mismatch importance weights and the mismatch metrics, with the same loss, gradients and metrics as the
separate no-grad pass (``GRPOTrainer._separate_old_logps_pass``, kept as the reference)."""

from __future__ import annotations

import pytest
import torch

from rlcore import GRPOConfig, ModelConfig

ROWS = [{"prompt": f"Write the number {n} and more numbers:"} for n in range(16)]
NOT_COMPARED = ("time_", "peak_memory_gib", "device_memory_used_gib")  # and every "..._per_second"


def _compared(metrics):
    return sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith(NOT_COMPARED)
                  and not k.endswith(("_per_second", "_seconds")))


def digit_share(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) + 0.01 * len(c) for c in completions]


def _trainer(tmp_path, separate_pass: bool, **overrides):
    from rlcore.trainer import GRPOTrainer

    values = dict(output_dir=str(tmp_path / ("separate" if separate_pass else "fused")), num_generations=4,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2, max_completion_length=12,
                  max_prompt_length=64, learning_rate=1e-3, max_steps=2, seed=5, gradient_checkpointing=False,
                  vllm_importance_sampling_clip_max=1.5)
    values.update(overrides)
    trainer = GRPOTrainer(ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32", cpu_threads=1),
                          reward_funcs=[digit_share], args=GRPOConfig(**values), train_dataset=ROWS,
                          show_progress=False)
    trainer._separate_old_logps_pass = separate_pass
    # The HF engine samples from the trainer's own weights (mismatch ~0, every weight 1); perturbing the
    # engine's reported log-probs makes the importance weights differ per token and per row, so that they are
    # really tested (some clipped or masked).
    generate = trainer.engine.generate

    def noisy_generate(prompt_ids, sampling):
        rollouts = generate(prompt_ids, sampling)
        noise = torch.Generator().manual_seed(sampling.seed or 0)
        for rollout in rollouts:
            rollout.logprobs = [p + 0.6 * float(torch.randn((), generator=noise)) for p in rollout.logprobs]
        return rollouts

    trainer.engine.generate = noisy_generate
    return trainer


def _step(trainer, step: int):
    """training_step's metrics, every gradient it applied, and how often the log-prob forward ran."""
    import rlcore.trainer as trainer_module

    grads, forwards = [], []
    hook = trainer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: grads.append([p.grad.clone() for p in trainer.trainable]))
    forward = trainer_module.completion_logprobs

    def counted(*args, **kwargs):
        forwards.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    trainer_module.completion_logprobs = counted
    try:
        metrics = trainer.training_step(step)
    finally:
        trainer_module.completion_logprobs = forward
        hook.remove()
    return metrics, grads, forwards


@pytest.mark.parametrize("overrides", [
    {},  # the default: sequence_mask weights, token-level ratio, dapo
    {"vllm_importance_sampling_mode": "token_truncate", "loss_type": "grpo"},
    {"importance_sampling_level": "sequence", "vllm_importance_sampling_mode": "sequence_truncate"},  # GSPO
    {"steps_per_generation": 1, "num_iterations": 2, "beta": 0.05},  # a replay inside the same optimizer step
], ids=["sequence_mask", "token_truncate", "gspo", "replay_and_kl"])
def test_training_forward_gives_the_same_step_as_the_separate_pass(tmp_path, overrides):
    fused, separate = _trainer(tmp_path, False, **overrides), _trainer(tmp_path, True, **overrides)
    assert fused._old_logps_from_training_forward and not separate._old_logps_from_training_forward
    for step in range(2):
        ours, our_grads, our_forwards = _step(fused, step)
        reference, reference_grads, reference_forwards = _step(separate, step)
        micro_steps = fused.args.gradient_accumulation_steps
        generation_size = fused.args.generation_batch_size // fused.args.per_device_train_batch_size
        reference_passes = 1 + (overrides.get("beta", 0) > 0)  # old log-probs (+ the reference model for KL)
        assert our_forwards.count(True) == reference_forwards.count(True) == micro_steps
        assert reference_forwards.count(False) == reference_passes * generation_size
        assert our_forwards.count(False) == (reference_passes - 1) * generation_size  # no old-log-prob pass
        compared = _compared(reference)
        assert _compared(ours) == compared and len(compared) > 30
        for key in compared:
            assert ours[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-6), key
        assert len(our_grads) == len(reference_grads) == 1
        ours_grad = torch.cat([g.flatten() for g in our_grads[0]])
        reference_grad = torch.cat([g.flatten() for g in reference_grads[0]])
        # the forwards with and without grad (different CPU attention kernels) agree to float32 rounding: a few
        # ulp of log-probs near -5 (ulp 4.8e-7) make a ratio 1 ± ~1e-6, so the gradients agree to 1e-5 of their
        # largest entry
        scale = float(reference_grad.abs().max())
        assert scale > 0
        torch.testing.assert_close(ours_grad, reference_grad, rtol=0, atol=1e-5 * scale)
    # the perturbed engine log-probs made the correction do something
    assert reference["mismatch_logp_diff_mean"] > 0.1 and reference["sampling_is_fraction_corrected"] > 0
    batch = fused.buffers[max(fused.buffers)]
    torch.testing.assert_close(batch.old_logps, separate.buffers[max(separate.buffers)].old_logps,
                               rtol=1e-6, atol=1e-6)


def test_off_policy_batches_keep_the_separate_pass(tmp_path):
    trainer = _trainer(tmp_path, False, steps_per_generation=4, gradient_accumulation_steps=2)
    assert not trainer._old_logps_from_training_forward  # a generation spans two optimizer updates
    _, _, forwards = _step(trainer, 0)
    assert forwards.count(False) == 4 and forwards.count(True) == 2
