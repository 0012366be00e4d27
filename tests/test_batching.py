"""Batch semantics: the four worked examples of the GRPO batching documentation (num_generations = 3)."""

import math

import pytest

from rlcore.batching import BatchSchedule, PromptSampler
from rlcore.config import GRPOConfig


def plan(config, micro_steps):
    schedule = BatchSchedule(config)
    return [schedule.micro_step(i) for i in range(micro_steps)]


@pytest.mark.parametrize(
    "batch, accumulation, expected_prompts, expected_slices",
    [
        # batch 3, accumulation 2: 6 completions = 2 prompts per generation; one optimizer step per generation
        (3, 2, 2, [(0, 1, 2), (3, 4, 5)]),
        # batch 3, accumulation 4: 12 completions = 4 prompts; one optimizer step per generation
        (3, 4, 4, [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]),
        # batch 6, accumulation 2: 12 completions = 4 prompts
        (6, 2, 4, [tuple(range(0, 6)), tuple(range(6, 12))]),
        # batch 6, accumulation 4: 24 completions = 8 prompts
        (6, 4, 8, [tuple(range(0, 6)), tuple(range(6, 12)), tuple(range(12, 18)), tuple(range(18, 24))]),
    ],
)
def test_documented_examples(batch, accumulation, expected_prompts, expected_slices):
    config = GRPOConfig(num_generations=3, per_device_train_batch_size=batch,
                        gradient_accumulation_steps=accumulation)
    assert config.effective_batch_size == accumulation * batch
    assert config.prompts_per_generation == expected_prompts
    steps = plan(config, 2 * accumulation)
    # first generation: the slices in order, the optimizer steps once, after the last one
    assert [s.sample_indices for s in steps[:accumulation]] == expected_slices
    assert [s.optimizer_step for s in steps[:accumulation]] == [False] * (accumulation - 1) + [True]
    assert [s.new_generation for s in steps] == ([True] + [False] * (accumulation - 1)) * 2
    assert [s.generation for s in steps] == [0] * accumulation + [1] * accumulation
    assert BatchSchedule(config).optimizer_steps_per_generation == 1


def test_more_steps_per_generation_than_accumulation():
    # a generation of 12 is consumed by two optimizer steps of 2 micro-steps each
    config = GRPOConfig(num_generations=3, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                        steps_per_generation=4)
    steps = plan(config, 8)
    assert config.generation_batch_size == 12
    assert [s.optimizer_step for s in steps] == [False, True] * 4
    assert [s.new_generation for s in steps] == [True, False, False, False] * 2
    assert [s.sample_indices[0] for s in steps] == [0, 3, 6, 9] * 2


def test_num_iterations_replays_the_generation():
    config = GRPOConfig(num_generations=3, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                        num_iterations=2)
    steps = plan(config, 6)
    assert [s.generation for s in steps] == [0, 0, 0, 0, 1, 1]
    assert [s.iteration for s in steps] == [0, 0, 1, 1, 0, 0]
    assert [s.sample_indices[0] for s in steps] == [0, 3, 0, 3, 0, 3]
    assert [s.optimizer_step for s in steps] == [False, True] * 3
    assert BatchSchedule(config).optimizer_steps_per_generation == 2


def test_generation_batch_size_sets_steps_per_generation():
    config = GRPOConfig(num_generations=4, per_device_train_batch_size=4, generation_batch_size=16)
    assert config.steps_per_generation == 4


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_generations=1), "num_generations"),
    (dict(num_generations=4, per_device_train_batch_size=3), "generation_batch_size"),
    (dict(steps_per_generation=2, generation_batch_size=16), "steps_per_generation"),
    (dict(num_generations=4, per_device_train_batch_size=4, generation_batch_size=10), "generation_batch_size"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(delta=1.0), "delta"),
    (dict(vllm_importance_sampling_clip_max=0.5), "vllm_importance_sampling_clip_max"),
    (dict(importance_sampling_level="word"), "importance_sampling_level"),
    (dict(scale_rewards="max"), "scale_rewards"),
    (dict(loss_type="luspo"), "importance_sampling_level"),
    (dict(top_p=0.0), "top_p"),
    (dict(learning_rate=-1e-5), "learning_rate"),
    (dict(reward_weights=[1.0, float("nan")]), "reward_weights"),
])
def test_impossible_settings_name_the_field(kwargs, field):
    kwargs.setdefault("num_generations", 2)
    kwargs.setdefault("per_device_train_batch_size", 2)
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**kwargs)


def test_scale_rewards_aliases_and_epsilon_high_default():
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    assert GRPOConfig(epsilon=0.3).epsilon_high == 0.3
    assert GRPOConfig(epsilon=0.3, epsilon_high=0.28).epsilon_high == 0.28


def test_replace_recomputes_derived_fields():
    config = GRPOConfig(num_generations=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    bigger = config.replace(gradient_accumulation_steps=4)
    assert bigger.steps_per_generation == 4 and bigger.generation_batch_size == 8


def test_prompt_sampler_groups_and_epochs():
    sampler = PromptSampler(dataset_size=5, prompts_per_generation=2, num_generations=3, seed=0)
    rows = sampler.completion_rows(0)
    assert len(rows) == 6 and rows[0] == rows[1] == rows[2] and rows[3] == rows[4] == rows[5]
    first_epoch = sampler.prompt_indices(0) + sampler.prompt_indices(1)
    assert len(set(first_epoch)) == 4  # no prompt twice within an epoch; the 5th is dropped (whole chunks)
    assert sampler.prompt_indices(2) != sampler.prompt_indices(0) or sampler.prompt_indices(3) != \
        sampler.prompt_indices(1)
    again = PromptSampler(dataset_size=5, prompts_per_generation=2, num_generations=3, seed=0)
    assert [again.prompt_indices(g) for g in range(6)] == [sampler.prompt_indices(g) for g in range(6)]


def test_total_optimizer_steps():
    config = GRPOConfig(num_generations=2, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    schedule = BatchSchedule(config)
    assert schedule.total_optimizer_steps(100, max_steps=7, num_train_epochs=1) == 7
    # 100 prompts / 4 per generation = 25 generations, 1 optimizer step each
    assert schedule.total_optimizer_steps(100, max_steps=-1, num_train_epochs=2) == 50
    with pytest.raises(ValueError, match="fewer than one generation"):
        schedule.total_optimizer_steps(3, max_steps=-1, num_train_epochs=1)


# ---------------------------------------------------------------------------------------------- several processes
@pytest.mark.parametrize("batch, group, steps", [(4, 4, 2), (8, 4, 3), (2, 4, 2), (2, 4, 4), (6, 4, 2), (3, 3, 2)])
def test_rank_shares_are_whole_groups_and_cover_the_generation(batch, group, steps, monkeypatch):
    world = 2
    monkeypatch.setenv("WORLD_SIZE", str(world))
    config = GRPOConfig(num_generations=group, per_device_train_batch_size=batch, gradient_accumulation_steps=steps)
    schedule = BatchSchedule(config)
    shares = [schedule.rank_completions(rank) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(config.generation_batch_size))  # each once
    for rank, share in enumerate(shares):
        assert len(share) == steps * batch
        assert share == [g * group + i for g in schedule.rank_groups(rank) for i in range(group)]  # whole groups
    # micro-step k of a rank reads its own rows [k·b, (k+1)·b), not the global ones
    assert [m.sample_indices for m in plan(config, steps)] == [tuple(range(k * batch, (k + 1) * batch))
                                                               for k in range(steps)]
    if batch % group == 0:
        # micro-step k of the ranks together = micro-step k of one process with batch 2·b
        for k in range(steps):
            together = sorted(i for share in shares for i in share[k * batch:(k + 1) * batch])
            assert together == list(range(k * world * batch, (k + 1) * world * batch))
    else:
        # each rank takes whole blocks of c = G / gcd(b, G) single-process micro-steps' worth of completions
        block = group // math.gcd(batch, group) * batch
        assert shares[0][:block] == list(range(block)) and shares[1][:block] == list(range(block, 2 * block))


def test_one_process_takes_every_group_and_the_sampler_keeps_a_rank_share(monkeypatch):
    config = GRPOConfig(num_generations=3, per_device_train_batch_size=3, gradient_accumulation_steps=2)
    assert BatchSchedule(config).rank_groups(0) == [0, 1]
    with pytest.raises(ValueError, match="rank=1"):
        BatchSchedule(config).rank_groups(1)
    whole = PromptSampler(dataset_size=10, prompts_per_generation=4, num_generations=2, seed=0)
    shares = [PromptSampler(dataset_size=10, prompts_per_generation=4, num_generations=2, seed=0, rank_groups=groups)
              for groups in ([0, 2], [1, 3])]
    for generation in range(5):  # across epochs too
        rows = whole.prompt_indices(generation)
        assert shares[0].completion_rows(generation) == [rows[0], rows[0], rows[2], rows[2]]
        assert shares[1].completion_rows(generation) == [rows[1], rows[1], rows[3], rows[3]]
    with pytest.raises(ValueError, match="rank_groups"):
        PromptSampler(dataset_size=10, prompts_per_generation=4, num_generations=2, seed=0, rank_groups=[4])
