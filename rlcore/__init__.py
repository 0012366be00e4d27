"""rlcore: GRPO / GSPO reinforcement learning for LLMs with one shared copy of the weights.

Heavy modules (the trainer, engines) are imported on first use so that ``import rlcore`` stays cheap.
"""

from rlcore.config import GRPOConfig, ModelConfig
from rlcore.rewards import RewardFunction

__version__ = "0.1.0"

_LAZY = {
    "GRPOTrainer": "rlcore.trainer",
    "HFEngine": "rlcore.hf_engine",
    "VLLMEngine": "rlcore.vllm_engine",
    "load_model_and_tokenizer": "rlcore.model",
}

__all__ = ["GRPOConfig", "ModelConfig", "RewardFunction", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlcore' has no attribute {name!r}")
