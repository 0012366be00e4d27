"""rlcore: GRPO / GSPO reinforcement learning for LLMs with one shared copy of the weights.

Heavy modules (the trainer, engines, torch) are imported on first use so that ``import rlcore`` stays cheap.
"""

import os as _os


def _map_source_checkout() -> None:
    """In a source checkout the subpackages ``rlcore.rewards`` / ``.envs`` / ``.kernels`` are the top-level
    folders ``rewards/``, ``envs/``, ``kernels/`` (pyproject.toml maps them when installing). When this package
    is imported from a checkout (the current directory is the clone, or nothing is installed) make them
    importable the same way, instead of "No module named 'rlcore.kernels'"."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if _os.path.isfile(_os.path.join(root, "pyproject.toml")) and all(
            _os.path.isfile(_os.path.join(root, name, "__init__.py")) for name in ("rewards", "envs", "kernels")):
        if root not in __path__:
            __path__.append(root)


_map_source_checkout()

from rlcore.config import GRPOConfig, ModelConfig  # noqa: E402
from rlcore.rewards import RewardFunction  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "GRPOTrainer": "rlcore.trainer",
    "HFEngine": "rlcore.hf_engine",
    "VLLMEngine": "rlcore.vllm_engine",
    "load_policy": "rlcore.model",
}

__all__ = ["GRPOConfig", "ModelConfig", "RewardFunction", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlcore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
