"""Reward functions: the :class:`RewardFunction` API and built-in rewards."""

from .base import FunctionReward, RewardError, RewardFunction, as_reward_function
from .scoring import RewardScores, score_completions

__all__ = [
    "FunctionReward",
    "RewardError",
    "RewardFunction",
    "RewardScores",
    "as_reward_function",
    "score_completions",
]
