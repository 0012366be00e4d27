"""The reward API: subclassing, plain functions, and errors that name the reward and the sample."""

import math

import numpy as np
import pytest

from rlcore.rewards import RewardError, RewardFunction, as_reward_function, score_completions


class Length(RewardFunction):
    def __call__(self, prompts, completions, **columns):
        return [float(len(c)) for c in completions]


class UsesAnswer(RewardFunction):
    name = "uses_answer"
    weight = 2.0

    def __call__(self, prompts, completions, answer, **columns):
        return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


def plain_reward(prompts, completions, **kwargs):
    return [0.5] * len(completions)


def test_subclass_and_plain_function_are_weighted_and_named():
    rewards = [Length(), UsesAnswer(), as_reward_function(plain_reward)]
    assert [r.name for r in rewards] == ["length", "uses_answer", "plain_reward"]
    scores = score_completions(rewards, ["p", "p"], ["ab 4", "xyz"], {"answer": ["4", "4"]})
    np.testing.assert_allclose(scores.values, [[4, 1, 0.5], [3, 0, 0.5]])
    np.testing.assert_allclose(scores.weighted_sum(), [4 + 2 + 0.5, 3 + 0 + 0.5])
    # reward_weights (GRPOConfig) overrides each reward's own weight
    scores = score_completions(rewards, ["p", "p"], ["ab 4", "xyz"], {"answer": ["4", "4"]}, [1.0, 0.0, 2.0])
    np.testing.assert_allclose(scores.weighted_sum(), [5.0, 4.0])


def test_plain_function_without_kwargs_gets_only_named_columns():
    def needs_answer(prompts, completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    scores = score_completions([as_reward_function(needs_answer)], ["p"], ["7"], {"answer": ["7"], "id": [3]})
    assert scores.values[0, 0] == 1.0


@pytest.mark.parametrize("bad, message", [
    (lambda n: [1.0] * (n - 1), "returned 2 values for 3 completions"),
    (lambda n: [1.0, None, 1.0], "returned None for sample 1"),
    (lambda n: [1.0, 1.0, math.nan], "returned nan for sample 2"),
    (lambda n: [1.0, "x", 1.0], "returned 'x' for sample 1"),
])
def test_bad_outputs_name_the_reward_and_sample(bad, message):
    def broken(prompts, completions, **kwargs):
        return bad(len(completions))

    with pytest.raises(RewardError, match="'broken'.*" + message.replace("(", r"\(")):
        score_completions([as_reward_function(broken)], ["p"] * 3, ["a", "b", "c"], {})


def test_raising_reward_is_named():
    def explodes(prompts, completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(RewardError, match="'explodes' raised KeyError"):
        score_completions([as_reward_function(explodes)], ["p"], ["a"], {})


def test_penalty_replaces_failures_and_counts_them():
    class Flaky(RewardFunction):
        penalty = -1.0

        def __call__(self, prompts, completions, **columns):
            return [None if c == "bad" else 1.0 for c in completions]

    scores = score_completions([Flaky()], ["p"] * 3, ["ok", "bad", "ok"], {})
    np.testing.assert_allclose(scores.values[:, 0], [1.0, -1.0, 1.0])
    assert scores.failures == {"flaky": 1}


def test_class_instead_of_instance_is_explained():
    with pytest.raises(TypeError, match="pass an instance of Length"):
        as_reward_function(Length)


def test_non_finite_weight_rejected():
    with pytest.raises(ValueError, match="weight"):
        Length(weight=float("inf"))
