"""Reward functions: the :class:`RewardFunction` API and built-in rewards."""

from .base import FunctionReward, RewardError, RewardFunction, RewardTimeoutError, as_reward_function, completion_text
from .code import FunctionWorks, NoCheating, StrategySucceeds, extract_function
from .math import CorrectAnswer, FormatReward, extract_final_answer
from .overlong import OverlongPenalty, soft_overlong_punishment
from .scoring import REWARD_LIMIT, RewardScores, score_completions

__all__ = [
    "CorrectAnswer",
    "FormatReward",
    "extract_final_answer",
    "FunctionReward",
    "FunctionWorks",
    "NoCheating",
    "OverlongPenalty",
    "REWARD_LIMIT",
    "RewardError",
    "RewardFunction",
    "RewardScores",
    "RewardTimeoutError",
    "StrategySucceeds",
    "as_reward_function",
    "completion_text",
    "extract_function",
    "score_completions",
    "soft_overlong_punishment",
]
