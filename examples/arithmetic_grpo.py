"""GRPO on grade-school arithmetic: a small Llama-3 model made here learns to stop copying its tutor's slips.

    python examples/make_arithmetic_model.py --out outputs/arithmetic-model     # ~100M model, SFT, GPU minutes
    python -m rlcore.run examples/arithmetic_grpo.py --set model=outputs/arithmetic-model
    python -m rlcore.run examples/arithmetic_grpo.py --set model=tiny           # CPU: builds the tiny model first

The model was fine-tuned on worked solutions from a tutor who slips on four of the six kinds of problem
(rlcore/arithmetic.py), so its greedy answers are right about a third of the time while sampling finds the
right one far more often. The rewards are the GSM8K ones: the final ``#### N`` equals the reference answer, plus
a small format reward. Held-out accuracy (greedy decoding, the ``eval_rewards/correct_answer`` column of
metrics.jsonl) is measured before the first step, every ``eval_steps`` steps and at the last step.
"""

from collections.abc import Iterator, Mapping

from rlcore.rewards import CorrectAnswer, FormatReward

from rlcore import GRPOConfig, ModelConfig
from rlcore.arithmetic import TINY_BUILD, build_arithmetic_model, grpo_problems, grpo_rows, heldout_problems

HELDOUT = 256
TRAIN_PROMPTS = 4096

model = ModelConfig(
    model_name_or_path="outputs/arithmetic-model",
    dtype="bfloat16",
    engine="auto",
    lora_r=16,
    lora_alpha=32,
    max_seq_length=512,
    gpu_memory_utilization=0.25,  # a 100M model needs little KV cache; standby releases it while training
    standby=True,
    enforce_eager=True,  # no compilation or CUDA-graph capture: the engine starts in seconds
)

config = GRPOConfig(
    output_dir="outputs/arithmetic",
    learning_rate=1e-3,
    lr_scheduler_type="linear",  # to 0 at max_steps; a constant rate of this size oscillates once solved
    warmup_ratio=0.0,
    weight_decay=0.0,
    max_grad_norm=1.0,
    num_generations=8,
    per_device_train_batch_size=128,  # 16 prompts × 8 completions per step
    gradient_accumulation_steps=1,
    max_prompt_length=128,
    max_completion_length=64,
    temperature=1.0,
    max_steps=200,
    eval_steps=10,
    per_device_eval_batch_size=HELDOUT,
    save_steps=100,
    logging_steps=1,
)

rewards = [CorrectAnswer(), FormatReward(weight=0.2)]


class _TinyPreset(Mapping):
    """The ``--set model=tiny`` overrides. Reading ``model_name_or_path`` builds the tiny arithmetic model
    (into rlcore's cache, once: about a minute of CPU) and gives its directory."""

    def __init__(self, values: dict) -> None:
        self._values = values

    def __getitem__(self, key: str):
        if key == "model_name_or_path":
            return build_arithmetic_model(settings=TINY_BUILD)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._values, "model_name_or_path"])

    def __len__(self) -> int:
        return len(self._values) + 1


tiny = _TinyPreset({
    "engine": "hf",
    "dtype": "float32",
    "output_dir": "outputs/arithmetic-tiny",
    "learning_rate": 3e-3,
    "per_device_train_batch_size": 64,  # 8 prompts × 8 completions
    "max_steps": 30,
    "save_steps": 30,
    "gradient_checkpointing": False,
})


def dataset(source: str | None = None) -> list[dict]:
    """GRPO prompts (chat messages) with the correct worked solution in ``answer``; none is held out."""
    if source not in (None, "arithmetic"):
        raise ValueError(f"dataset={source!r}: this example generates its own problems; leave dataset unset")
    return grpo_rows(grpo_problems(TRAIN_PROMPTS, seed=0, heldout=heldout_problems(HELDOUT, seed=0)))


def eval_dataset(source: str | None = None) -> list[dict]:
    """The held-out problems (the same ones the model's build measured after fine-tuning)."""
    return grpo_rows(heldout_problems(HELDOUT, seed=0))
