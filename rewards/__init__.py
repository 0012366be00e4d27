"""Reward functions: the :class:`RewardFunction` API and built-in rewards."""

from .base import FunctionReward, RewardError, RewardFunction, as_reward_function
from .math import CorrectAnswer, FormatReward, extract_final_answer
from .base import completion_text
from .code import FunctionWorks, NoCheating, StrategySucceeds, extract_function
from .scoring import RewardScores, score_completions

__all__ = [
    "CorrectAnswer",
    "FormatReward",
    "extract_final_answer",
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
