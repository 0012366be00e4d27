"""The reward API: subclassing, plain functions, and errors that name the reward and the sample."""

import inspect
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
    (lambda n: [1.0, 1.0, math.nan], "returned nan for sample 2"),
    (lambda n: [1.0, "x", 1.0], "returned 'x' for sample 1"),
    (lambda n: [1.0, 1.0, math.inf], "returned inf for sample 2"),
    (lambda n: [1.0, 1e39, 1.0], "returned 1e\\+39 for sample 1.*float32"),
    (lambda n: [10 ** 400, 1.0, 1.0], "for sample 0.*float32"),
    (lambda n: {i: 1.0 for i in range(n)}, "returned dict .*a dict is not accepted"),
    (lambda n: (1.0 for _ in range(n)), "returned generator"),
    (lambda n: "1.0", "returned str"),
    (lambda n: 1.0, "returned float"),
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
            return [math.nan if c == "bad" else 1.0 for c in completions]

    scores = score_completions([Flaky()], ["p"] * 3, ["ok", "bad", "ok"], {})
    np.testing.assert_allclose(scores.values[:, 0], [1.0, -1.0, 1.0])
    assert scores.failures == {"flaky": 1}


def test_class_instead_of_instance_is_explained():
    with pytest.raises(TypeError, match="pass an instance of Length"):
        as_reward_function(Length)


def test_non_finite_weight_rejected():
    with pytest.raises(ValueError, match="weight"):
        Length(weight=float("inf"))


# ---------------------------------------------------------------------------------------------- None: "does not apply"
def test_none_means_does_not_apply():
    def sometimes(prompts, completions, **kwargs):
        return [None if c == "skip" else 2.0 for c in completions]

    def never(prompts, completions, **kwargs):
        return [None] * len(completions)

    rewards = [as_reward_function(sometimes), as_reward_function(never)]
    scores = score_completions(rewards, ["p"] * 3, ["a", "skip", "b"], {}, [1.0, 3.0])
    assert np.isnan(scores.values[1, 0]) and np.isnan(scores.values[:, 1]).all()
    total = scores.weighted_sum()
    assert total[0] == 2.0 and total[2] == 2.0 and np.isnan(total[1])  # sample 1: no reward applies
    metrics = scores.metrics()
    assert metrics["reward_mean"] == 2.0 and metrics["rewards/sometimes/mean"] == 2.0
    assert math.isnan(metrics["rewards/never/mean"]) and metrics["rewards/unscorable"] == 1


def test_numpy_and_torch_outputs_are_sequences():
    import torch

    def as_numpy(prompts, completions, **kwargs):
        return np.arange(len(completions), dtype=np.float32)

    def as_torch(prompts, completions, **kwargs):
        return torch.ones(len(completions))

    def scalars(prompts, completions, **kwargs):
        return [torch.tensor(0.5), np.float64(0.25)]

    scores = score_completions([as_reward_function(f) for f in (as_numpy, as_torch, scalars)], ["p"] * 2,
                               ["a", "b"], {})
    np.testing.assert_array_equal(scores.values, [[0.0, 1.0, 0.5], [1.0, 1.0, 0.25]])


# ---------------------------------------------------------------------------------------------- float32 range
def test_weighted_sum_beyond_float32_is_refused_naming_the_sample():
    def big(prompts, completions, **kwargs):
        return [1.0, 1e38]

    with pytest.raises(RewardError, match=r"weighted reward of sample 1 .*big 1e\+38 × weight 3"):
        score_completions([as_reward_function(big)], ["p"] * 2, ["a", "b"], {}, [3.0])


def test_large_rewards_keep_nonzero_advantages():
    # 1e20 is fine for the float32 reward but its square is not: the advantages must still be ±0.707
    import torch

    from rlcore.advantages import group_advantages

    def big(prompts, completions, **kwargs):
        return [0.0, 1e20, 1e30, -1e30]

    scores = score_completions([as_reward_function(big)], ["p"] * 4, list("abcd"), {})
    rewards = torch.as_tensor(scores.weighted_sum(), dtype=torch.float32)  # as the trainer does
    advantages, _ = group_advantages(rewards, 2, "group")
    assert advantages.dtype == torch.float32
    np.testing.assert_allclose(advantages.numpy(), [-0.7071, 0.7071, 0.7071, -0.7071], atol=1e-4)


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("penalty", [math.nan, math.inf, "-1", True])
def test_penalty_must_be_a_finite_number(penalty):
    with pytest.raises(ValueError, match="penalty must be a finite number"):
        Length(penalty=penalty)

    class Bad(RewardFunction):  # set on the class, checked before scoring
        def __call__(self, prompts, completions, **columns):
            return [1.0] * len(completions)

    reward = Bad()
    reward.penalty = penalty
    with pytest.raises(ValueError, match="'bad': penalty must be a finite number"):
        score_completions([reward], ["p"], ["a"], {})


@pytest.mark.parametrize("timeout", [0, -1, math.inf, "5"])
def test_timeout_must_be_positive(timeout):
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        Length(timeout=timeout)


def test_penalty_covers_wrong_length_and_raising():
    def short(prompts, completions, **kwargs):
        return [1.0]

    def raises(prompts, completions, **kwargs):
        raise RuntimeError("boom")

    rewards = [as_reward_function(short), as_reward_function(raises)]
    for reward in rewards:
        reward.penalty = -2.0
    with pytest.warns(UserWarning) as caught:
        scores = score_completions(rewards, ["p"] * 3, ["a", "b", "c"], {})
    np.testing.assert_array_equal(scores.values, [[-2.0, -2.0]] * 3)
    assert scores.failures == {"short": 3, "raises": 3}
    assert any("'raises' raised RuntimeError: boom" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------- raising rewards
class ParsesAnswer(RewardFunction):
    def __call__(self, prompts, completions, **columns):
        return [float(int(c)) for c in completions]  # raises on sample 2


def test_raising_reward_names_the_sample_and_its_own_line():
    with pytest.raises(RewardError) as caught:
        score_completions([ParsesAnswer()], ["p"] * 4, ["1", "2", "two", "4"], {})
    message = str(caught.value)
    assert "reward 'parses_answer' raised ValueError" in message
    assert "on sample 2 (prompt 'p', completion 'two')" in message
    source, start = inspect.getsourcelines(ParsesAnswer.__call__)
    line = start + next(i for i, text in enumerate(source) if "return [float(int(c))" in text)
    assert f"{__file__}:{line} in __call__: return [float(int(c)) for c in completions]" in message


def test_failure_only_in_a_batch_is_reported_for_the_batch():
    def fails_on_three(prompts, completions, **kwargs):
        if len(completions) == 3:
            raise ValueError("batch of three")
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match="on a batch of 3 completions .no single completion reproduces it"):
        score_completions([as_reward_function(fails_on_three)], ["p"] * 3, ["a", "b", "c"], {})


def test_system_exit_in_a_reward_is_its_error_and_keyboard_interrupt_passes():
    def exits(prompts, completions, **kwargs):
        raise SystemExit(3)

    def interrupted(prompts, completions, **kwargs):
        raise KeyboardInterrupt

    for timeout in (None, 5.0):  # in the calling thread and in the helper thread
        reward = as_reward_function(exits)
        reward.timeout = timeout
        with pytest.raises(RewardError, match="'exits' raised SystemExit: 3 on sample 0"):
            score_completions([reward], ["p"], ["a"], {})
        reward = as_reward_function(interrupted)
        reward.timeout = timeout
        with pytest.raises(KeyboardInterrupt):
            score_completions([reward], ["p"], ["a"], {})


def test_hung_reward_times_out_naming_the_reward_and_batch():
    import threading
    import time

    from rlcore.rewards import RewardTimeoutError

    release = threading.Event()

    class Hangs(RewardFunction):
        timeout = 0.3
        penalty = 0.0  # a timeout stops training all the same

        def __call__(self, prompts, completions, **columns):
            release.wait(30)
            return [1.0] * len(completions)

    start = time.monotonic()
    try:
        with pytest.raises(RewardTimeoutError, match=r"'hangs' did not return within 0.3 s on a batch of 2 "
                                                     r"completions \(samples 0-1; sample 0 \(prompt 'p'"):
            score_completions([Hangs()], ["p", "q"], ["a", "b"], {})
        assert time.monotonic() - start < 5
    finally:
        release.set()  # let the abandoned thread finish


def test_reward_thread_sees_the_callers_grad_mode():
    import torch

    seen = []

    def records(prompts, completions, **kwargs):
        seen.append(torch.is_grad_enabled())
        return [0.0] * len(completions)

    with torch.no_grad():
        score_completions([as_reward_function(records)], ["p"], ["a"], {})
    score_completions([as_reward_function(records)], ["p"], ["a"], {})
    assert seen == [False, True]
