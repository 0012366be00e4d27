"""Reward functions: the :class:`RewardFunction` API and built-in rewards."""

from .base import FunctionReward, RewardError, RewardFunction, as_reward_function
from .code import FunctionWorks, NoCheating, StrategySucceeds, completion_text, extract_function
from .scoring import RewardScores, score_completions

__all__ = [
    "FunctionReward",
    "FunctionWorks",
    "NoCheating",
    "RewardError",
    "RewardFunction",
    "RewardScores",
    "StrategySucceeds",
    "as_reward_function",
    "completion_text",
    "extract_function",
    "score_completions",
]
