"""Dynamic sampling (DAPO): groups whose rewards tie are dropped and replaced by groups of further prompts, with
bounded retries counted in the metrics; when the retries run out, the step trains on the informative groups
alone (the filler rows are out of the loss)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlcore import GRPOConfig, ModelConfig
from rlcore.dynamic_sampling import (SamplingRound, extra_prompt_rows, fill_generation, informative_groups,
                                     next_round_size, select_groups)

NAN = float("nan")


# ---------------------------------------------------------------------- the pure parts
def test_informative_groups_by_hand():
    rewards = np.array([1.0, 1.0, 1.0,  # a tie: no signal
                        0.0, 1.0, 0.0,  # differ
                        NAN, 2.0, 2.0,  # unscorable one, the others tie
                        NAN, NAN, 3.0,  # one scorable completion: std undefined, advantage 0
                        0.5, NAN, 0.7])  # two scorable that differ
    assert informative_groups(rewards, 3).tolist() == [False, True, False, False, True]
    assert informative_groups(np.array([0.2, 0.2 + 1e-12]), 2).tolist() == [False]  # below isclose's tolerance
    with pytest.raises(ValueError, match="multiple of num_generations=3"):
        informative_groups(np.zeros(4), 3)


def test_round_size_and_prompt_draws():
    assert next_round_size(missing=3, tried=8, kept=5, needed=8) == 5  # ceil(3 · 8 / 5)
    assert next_round_size(missing=3, tried=8, kept=1, needed=8) == 8  # capped at a generation's worth
    assert next_round_size(missing=4, tried=4, kept=0, needed=4) == 4
    assert next_round_size(missing=0, tried=4, kept=4, needed=4) == 0
    rows = extra_prompt_rows(20, 5, (7, 3, 1), exclude={0, 1, 2})
    assert rows == extra_prompt_rows(20, 5, (7, 3, 1), exclude={0, 1, 2})  # deterministic in the key
    assert len(set(rows)) == 5 and not set(rows) & {0, 1, 2} and all(0 <= r < 20 for r in rows)
    assert rows != extra_prompt_rows(20, 5, (7, 3, 2), exclude={0, 1, 2})
    assert sorted(extra_prompt_rows(5, 9, (1,), exclude={1, 3})) == [0, 2, 4]  # fewer left than asked
    assert extra_prompt_rows(3, 2, (1,), exclude={0, 1, 2}) == []


def test_select_groups_keeps_informative_first_then_fills():
    tie, vary = [1.0, 1.0], [0.0, 1.0]
    rounds = [SamplingRound([10, 11, 12], np.array(tie + vary + tie)), SamplingRound([13, 14], np.array(vary + vary))]
    assert select_groups(rounds, 2, 3) == ([(0, 1), (1, 0), (1, 1)], [])
    assert select_groups(rounds, 2, 2) == ([(0, 1), (1, 0)], [])  # beyond what is needed: not used
    # short: round 0's dropped groups fill the places after the informative ones, and are excluded
    assert select_groups(rounds[:1], 2, 3) == ([(0, 1), (0, 0), (0, 2)], [1, 2])


def _draw_by_row(informative_rows: set[int], num_generations: int, calls: list):
    """Rewards that vary within a group for the rows in ``informative_rows`` and tie for every other row."""
    def rewards(rows):
        return np.concatenate([np.arange(num_generations, dtype=float) if row in informative_rows
                               else np.zeros(num_generations) for row in rows])

    def draw(k, rows):
        calls.append((k, list(rows)))
        return SamplingRound(list(rows), rewards(rows))

    return rewards, draw


def test_fill_generation_replaces_tied_groups_within_the_retries():
    informative = set(range(0, 40, 2))  # even rows teach, odd rows tie
    calls = []
    rewards, draw = _draw_by_row(informative, 4, calls)
    first = SamplingRound([1, 2, 3, 5], rewards([1, 2, 3, 5]))  # one informative group of four
    selection = fill_generation(first, needed=4, num_generations=4, max_retries=5, dataset_size=40, key=(3, 0),
                                draw=draw)
    chosen = [selection.rounds[r].prompt_rows[g] for r, g in selection.groups]
    assert len(chosen) == 4 and all(row in informative for row in chosen) and chosen[0] == 2
    assert selection.excluded == [] and selection.metrics["dynamic_sampling_filled"] == 1.0
    drawn = [row for _, rows in calls for row in rows]
    assert len(drawn) == len(set(drawn)) and not set(drawn) & {1, 2, 3, 5}  # each prompt once per generation
    assert [k for k, _ in calls] == list(range(1, len(calls) + 1))
    assert len(calls[0][1]) == 4  # round 1: missing 3 at a keep rate of 1/4 → capped at a generation's worth
    assert selection.metrics["dynamic_sampling_rounds"] == len(calls)
    assert selection.metrics["dynamic_sampling_extra_completions"] == 4 * len(drawn)
    tried = 4 + len(drawn)
    kept = sum(row in informative for row in [1, 2, 3, 5] + drawn)
    assert selection.metrics["dynamic_sampling_groups_dropped"] == tried - kept
    # the same key draws the same prompts (a resumed run)
    again = []
    fill_generation(first, 4, 4, 5, 40, (3, 0), _draw_by_row(informative, 4, again)[1])
    assert again == calls


def test_fill_generation_stops_at_max_retries_and_fills_with_excluded_groups():
    calls = []
    rewards, draw = _draw_by_row(set(), 2, calls)  # every group ties
    first = SamplingRound([0, 1, 2], rewards([0, 1, 2]))
    selection = fill_generation(first, 3, 2, max_retries=2, dataset_size=100, key=(1,), draw=draw)
    assert len(calls) == 2 and all(len(rows) == 3 for _, rows in calls)
    assert selection.groups == [(0, 0), (0, 1), (0, 2)] and selection.excluded == [0, 1, 2]
    assert selection.metrics["dynamic_sampling_filled"] == 0.0
    assert selection.metrics["dynamic_sampling_excluded_groups"] == 3
    assert fill_generation(first, 3, 2, max_retries=0, dataset_size=100, key=(1,), draw=draw).metrics[
        "dynamic_sampling_rounds"] == 0
    # a dataset with no prompt left ends the retries early
    small = fill_generation(first, 3, 2, max_retries=5, dataset_size=3, key=(1,), draw=draw)
    assert small.metrics["dynamic_sampling_rounds"] == 0 and small.excluded == [0, 1, 2]


def test_config_names_the_field():
    with pytest.raises(ValueError, match="dynamic_sampling_max_retries=-1"):
        GRPOConfig(dynamic_sampling=True, dynamic_sampling_max_retries=-1)
    with pytest.raises(ValueError, match="dynamic_sampling='yes'"):
        GRPOConfig(dynamic_sampling="yes")


# ---------------------------------------------------------------------- in the trainer (tiny model, CPU)
ROWS = [{"prompt": f"Write the number {n} and more numbers:", "kind": "tie" if n % 3 else "vary"} for n in range(24)]


class TiesForSomePrompts:
    """0.5 for every completion of a "tie" prompt (no learning signal); a spread of values for "vary" prompts."""

    name = "ties_for_some"

    def __init__(self):
        self.scored = 0

    def __call__(self, prompts, completions, kind, completion_ids, **columns):
        self.scored += len(completions)
        return [0.5 if k == "tie" else float(sum(ids) % 97) / 97 + 0.001 * i
                for i, (k, ids) in enumerate(zip(kind, completion_ids))]


def _trainer(tmp_path, reward, **overrides):
    from rlcore.trainer import GRPOTrainer

    values = dict(output_dir=str(tmp_path / "run"), num_generations=4, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, max_completion_length=8, max_prompt_length=64, learning_rate=1e-3,
                  max_steps=2, seed=11, gradient_checkpointing=False, dynamic_sampling=True,
                  dynamic_sampling_max_retries=4, shuffle_dataset=False)
    values.update(overrides)
    return GRPOTrainer(ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32", cpu_threads=1),
                       reward_funcs=[reward], args=GRPOConfig(**values), train_dataset=ROWS, show_progress=False)


def test_trainer_fills_the_batch_with_groups_that_teach(tmp_path):
    reward = TiesForSomePrompts()
    trainer = _trainer(tmp_path, reward)
    # without shuffling, generation 0 is rows 0 and 1: row 0 varies, row 1 ties
    assert [trainer.train_rows[i]["kind"] for i in trainer.sampler.prompt_indices(0)] == ["vary", "tie"]
    metrics = trainer.training_step(0)
    batch = trainer.buffers[0]
    groups = batch.advantages.view(-1, 4)
    assert bool((groups != 0).any(dim=1).all())  # every group of the batch has a learning signal
    assert torch.equal(batch.loss_mask, batch.completion_mask)  # nothing excluded: all of it trains
    assert metrics["dynamic_sampling_filled"] == 1.0 and metrics["dynamic_sampling_excluded_groups"] == 0
    assert metrics["dynamic_sampling_groups_dropped"] >= 1 and metrics["dynamic_sampling_rounds"] >= 1
    # the reward metrics cover every completion generated, dropped groups included
    assert reward.scored == trainer.args.generation_batch_size + metrics["dynamic_sampling_extra_completions"]
    assert metrics["generated_tokens"] >= metrics["completion_tokens"] > 0
    assert metrics["grad_norm"] > 0 and not metrics["update_skipped"]
    # deterministic: a second trainer with the same seed makes the same batch
    again = _trainer(tmp_path / "again", TiesForSomePrompts())
    again.training_step(0)
    assert torch.equal(again.buffers[0].completion_ids, batch.completion_ids)


def test_when_every_group_ties_the_step_trains_on_nothing(tmp_path):
    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    trainer = _trainer(tmp_path, constant, dynamic_sampling_max_retries=2)
    metrics = trainer.training_step(0)
    batch = trainer.buffers[0]
    assert metrics["dynamic_sampling_filled"] == 0.0 and metrics["dynamic_sampling_excluded_groups"] == 2
    assert metrics["dynamic_sampling_rounds"] == 2
    assert int(batch.loss_mask.sum()) == 0 and bool((batch.advantages == 0).all())
    assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0


def test_without_dynamic_sampling_tied_groups_stay(tmp_path):
    reward = TiesForSomePrompts()
    trainer = _trainer(tmp_path, reward, dynamic_sampling=False)
    metrics = trainer.training_step(0)
    assert reward.scored == trainer.args.generation_batch_size
    assert not [k for k in metrics if k.startswith("dynamic_sampling")]
    assert metrics["advantage_frac_zero_std_groups"] == 0.5  # row 1's group ties and is trained on


def test_a_resumed_run_draws_the_same_extra_prompts(tmp_path):
    import os

    from rlcore.reporting import read_metrics

    full = _trainer(tmp_path / "full", TiesForSomePrompts(), max_steps=3, save_steps=1)
    expected = read_metrics(full.train()["metrics_file"])
    assert sum(r["dynamic_sampling_groups_dropped"] for r in expected) > 0
    resumed = _trainer(tmp_path / "resumed", TiesForSomePrompts(), max_steps=3, save_steps=1)
    resumed.train(resume_from_checkpoint=os.path.join(full.args.output_dir, "checkpoint-1"))
    records = read_metrics(os.path.join(resumed.args.output_dir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [2, 3]
    for key in ("loss", "grad_norm", "reward_mean", "dynamic_sampling_groups_dropped",
                "dynamic_sampling_extra_completions"):
        assert [r[key] for r in records] == pytest.approx([r[key] for r in expected[1:]], abs=1e-6), key
