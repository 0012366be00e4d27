"""A float16 policy trains with dynamic loss scaling (kernels/fp16_stability.DynamicLossScaler): without it the
16-bit backward of a small loss underflows to a zero gradient; with it the gradient matches the float32 model's.
Scale back-offs skip the update without counting toward max_consecutive_nonfinite; the scale is checkpointed."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from rlcore import GRPOConfig, ModelConfig

ROWS = [{"prompt": f"Write the number {n} and more numbers:"} for n in range(16)]


def tiny_reward(prompts, completions, completion_ids, **columns):
    # rewards of order 1e-6 and no std scaling: advantages, and so the gradients flowing back through the
    # 16-bit activations, are far below float16's smallest subnormal (6e-8) unless the loss is scaled
    return [1e-6 * (sum(ids) % 13) for ids in completion_ids]


def _trainer(tmp_path, dtype: torch.dtype, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlcore.tiny_model import build_tiny_model
    from rlcore.trainer import GRPOTrainer

    path = build_tiny_model()
    values = dict(output_dir=str(tmp_path / str(dtype)), num_generations=4, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, max_completion_length=12, max_prompt_length=64,
                  learning_rate=1e-3, max_steps=2, save_steps=1, seed=5, gradient_checkpointing=False,
                  scale_rewards="none")
    values.update(overrides)
    return GRPOTrainer(AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                       processing_class=AutoTokenizer.from_pretrained(path), reward_funcs=[tiny_reward],
                       args=GRPOConfig(**values), train_dataset=ROWS, show_progress=False,
                       model_config=ModelConfig(cpu_threads=1))


def _step_on(trainer, batch):
    """training_step on a given generation batch; returns its metrics and the gradient it applied (or None)."""
    trainer.buffers = {0: copy.deepcopy(batch)}
    applied = []
    hook = trainer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: applied.append(torch.cat([p.grad.flatten() for p in trainer.trainable])))
    try:
        metrics = trainer.training_step(0)
    finally:
        hook.remove()
    return metrics, (applied[0] if applied else None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A float32 trainer and one generation batch of it (the same completions for every trainer below)."""
    trainer = _trainer(tmp_path_factory.mktemp("fp32"), torch.float32)
    batch = trainer.make_rollout_batch(0)
    assert trainer.loss_scaler is None and batch.advantages.abs().max() < 1e-5
    metrics, gradient = _step_on(trainer, batch)
    return batch, metrics, gradient


def test_float16_gradient_underflows_without_scaling_and_matches_float32_with_it(tmp_path, reference):
    batch, reference_metrics, reference_gradient = reference
    trainer = _trainer(tmp_path, torch.float16)
    assert trainer.loss_scaler is not None and trainer.loss_scaler.scale == 2.0**16
    assert {p.dtype for p in trainer.trainable} == {torch.float32}  # float32 masters for the adapters
    metrics, gradient = _step_on(trainer, batch)
    assert reference_gradient.norm() > 0
    relative = float((gradient - reference_gradient).norm() / reference_gradient.norm())
    assert torch.isfinite(gradient).all() and relative < 0.02, relative  # float16 rounding, nothing lost
    assert metrics["grad_norm"] == pytest.approx(reference_metrics["grad_norm"], rel=0.02)
    assert metrics["loss_scale"] == 2.0**16 and not metrics["update_skipped"]

    unscaled = _trainer(tmp_path / "unscaled", torch.float16)
    unscaled.loss_scaler = None
    metrics, gradient = _step_on(unscaled, batch)
    assert float(gradient.abs().max()) == 0.0  # every 16-bit gradient underflowed
    assert "loss_scale" not in metrics


def test_overflow_backs_off_the_scale_without_counting(tmp_path, reference):
    batch = reference[0]
    trainer = _trainer(tmp_path, torch.float16, max_consecutive_nonfinite=1)
    trainer.loss_scaler.scale = 2.0**40  # scaled gradients beyond float16's 65,504
    before = [p.detach().clone() for p in trainer.trainable]
    metrics, gradient = _step_on(trainer, batch)
    assert gradient is None and metrics["update_skipped"]  # skipped ...
    assert metrics["loss_scale"] == 2.0**39 and trainer._consecutive_nonfinite == 0  # ... not counted
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.trainable))
    trainer.loss_scaler.scale = 1.0  # at a scale of 1 an overflow is not the scale's: it counts
    from rlcore.trainer import NonFiniteLossError

    hook = trainer.trainable[0].register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteLossError, match="1 optimizer steps in a row"):
        _step_on(trainer, batch)
    hook.remove()


def test_loss_scale_is_checkpointed(tmp_path):
    from rlcore.checkpoint import list_checkpoints, load_trainer_state

    trainer = _trainer(tmp_path, torch.float16, max_steps=1)
    trainer.loss_scaler.scale = 1024.0
    trainer.train()
    checkpoint = list_checkpoints(trainer.args.output_dir)[-1]
    assert load_trainer_state(checkpoint)["loss_scaler"] == {"scale": 1024.0, "good_steps": 1}
    resumed = _trainer(tmp_path, torch.float16, max_steps=1)
    assert resumed.loss_scaler.scale == 2.0**16
    resumed.train(resume_from_checkpoint=os.path.join(checkpoint))
    assert (resumed.loss_scaler.scale, resumed.loss_scaler.good_steps) == (1024.0, 1)
