"""A model that learns: the sign and the plumbing of the whole loop, on a verifiable synthetic task.

The tiny random model is rewarded for the share of digit characters in its completion. Starting from
random weights about 40% of its characters are digits; GRPO must raise the reward. We compare the mean reward of the first
10 steps with the last 10, for token- and sequence-level importance sampling and the dapo and grpo losses.
"""

import pytest

from rlcore import GRPOConfig, ModelConfig
from rlcore.reporting import read_metrics
from rlcore.rewards import RewardFunction

STEPS = 40
# Observed over seeds 0-3 for every case below: first-10 mean 0.36-0.44, last-10 mean 0.58-0.98, i.e. a
# gain of 0.21 at worst (token/dapo, seed 0) and 0.53-0.62 otherwise. The assertion asks for 0.15.
# On-policy (num_iterations = 1) the token- and sequence-level gradients coincide for dapo and grpo, so the
# sequence cases check the GSPO code path end to end rather than a different learning curve; the loss tests
# compare the two levels off-policy against TRL.
MARGIN = 0.15


class DigitShare(RewardFunction):
    def __call__(self, prompts, completions, **columns):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def learning_run(tmp_path, level, loss_type, seed=0):
    from rlcore.trainer import GRPOTrainer

    rows = [{"prompt": f"Say some numbers, {word}:"} for word in ("please", "now", "here", "again") * 8]
    config = GRPOConfig(output_dir=str(tmp_path / f"{level}-{loss_type}"), num_generations=8,
                        per_device_train_batch_size=16, gradient_accumulation_steps=1, max_completion_length=12,
                        learning_rate=2e-2, max_steps=STEPS, save_steps=STEPS, seed=seed,
                        importance_sampling_level=level, loss_type=loss_type, gradient_checkpointing=False,
                        num_iterations=1)
    trainer = GRPOTrainer(ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32", lora_r=8,
                                      lora_alpha=16), reward_funcs=[DigitShare()], args=config,
                          train_dataset=rows, show_progress=False)
    summary = trainer.train()
    rewards = [r["reward_mean"] for r in read_metrics(summary["metrics_file"])]
    return sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10


@pytest.mark.parametrize("level, loss_type", [("token", "dapo"), ("sequence", "dapo"), ("token", "grpo"),
                                              ("sequence", "grpo")])
def test_reward_rises(tmp_path, level, loss_type):
    first, last = learning_run(tmp_path, level, loss_type)
    assert last > first + MARGIN, f"{level}/{loss_type}: first-10 mean {first:.3f}, last-10 mean {last:.3f}"
