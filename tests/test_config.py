"""Settings are validated once, at construction, from one source of names; absurd values name their field."""

from __future__ import annotations

import pytest

from rlcore import config as config_module
from rlcore.config import GRPOConfig, ModelConfig
from rlcore.loss import LossSettings


@pytest.mark.parametrize("kwargs, field, words", [
    (dict(seed=-1), "seed", "from 0 to 4294967295"),
    (dict(seed=2**32), "seed", "from 0 to"),
    (dict(epsilon=1e308), "epsilon", "lowest importance ratio"),
    (dict(epsilon=1.0), "epsilon", "< 1"),
    (dict(epsilon_high=1e308), "epsilon_high", "never binds"),
    (dict(delta=1e308), "delta", "never binds"),
    (dict(vllm_importance_sampling_clip_max=1e308), "vllm_importance_sampling_clip_max", "never binds"),
    (dict(off_policy_mask_threshold=1e308), "off_policy_mask_threshold", "<= 10000"),
    (dict(sapo_temperature_pos=1e308), "sapo_temperature_pos", "<= 10000"),
    (dict(learning_rate=1e10), "learning_rate", "LoRA RL uses"),
    (dict(learning_rate=1.5), "learning_rate", "<= 1"),
    (dict(num_processes=2), "num_processes", "torchrun"),
    (dict(gradient_checkpointing="yes"), "gradient_checkpointing", "True or False"),
    (dict(overwrite_output_dir=1), "overwrite_output_dir", "True or False"),
])
def test_absurd_values_are_refused_at_construction(kwargs, field, words):
    with pytest.raises(ValueError, match=field) as raised:
        GRPOConfig(**kwargs)
    assert words in str(raised.value)


def test_edge_values_that_make_sense_are_accepted():
    GRPOConfig(seed=0, learning_rate=1.0, epsilon=0.99, epsilon_high=5.0, delta=10_000,
               vllm_importance_sampling_clip_max=10_000)
    GRPOConfig(seed=2**32 - 1, loss_type="cispo", epsilon_high=5.0)


def test_num_processes_changes_nothing():
    # the batch arithmetic of one process: num_processes is accepted only as 1, so it cannot multiply anything
    config = GRPOConfig(num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                        num_processes=1)
    assert (config.generation_batch_size, config.steps_per_generation, config.effective_batch_size) == (8, 2, 8)


def test_loss_settings_and_config_share_one_validation():
    # the same bad value gives the same message from both (one function checks both)
    for bad in (dict(loss_type="ppo"), dict(epsilon=5.0), dict(delta=0.5), dict(top_entropy_quantile=2.0),
                dict(loss_type="luspo"), dict(importance_sampling_level="word"), dict(beta=-1.0)):
        with pytest.raises(ValueError) as from_config:
            GRPOConfig(**bad)
        with pytest.raises(ValueError) as from_settings:
            LossSettings(**bad)
        assert str(from_config.value) == str(from_settings.value), bad


def test_names_have_one_source():
    from rlcore import advantages, loss

    assert loss.LOSS_TYPES is config_module.LOSS_TYPES
    assert loss.IS_MODES is config_module.VLLM_IS_MODES
    assert loss.IMPORTANCE_SAMPLING_LEVELS is config_module.IMPORTANCE_SAMPLING_LEVELS
    assert advantages.SCALE_REWARDS is config_module.SCALE_REWARDS
    with pytest.raises(ValueError, match="scale_rewards"):
        advantages.group_advantages(__import__("torch").zeros(4), 2, "max")


def test_model_config_still_validates():
    with pytest.raises(ValueError, match="lora_r"):
        ModelConfig(lora_r=0)
    with pytest.raises(ValueError, match="cpu_threads"):
        ModelConfig(cpu_threads=0)
