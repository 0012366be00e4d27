"""GRPO on 2048: the model learns to write a Python strategy function that wins the game.

    python -m rlcore.run examples/game2048_grpo.py                    # Meta-Llama-3-8B-Instruct, vLLM, GPU
    python -m rlcore.run examples/game2048_grpo.py --set model=tiny   # tiny random model, CPU, a few steps

Every completion's ```python block is screened (allow-listed imports only, no escape routes), then run in a
locked-down worker process (CPU, memory, no processes, no files, no network) that plays one game against
the trusted game engine in this process. The three rewards:

* FunctionWorks: +1 the code builds a ``strategy`` function, -0.5 it does not, -2 no function at all;
* NoCheating: +1 allowed code, -20 forbidden imports or escape attempts, -1 no function;
* StrategySucceeds: +20 reaches the target tile, +2 plays without winning, -1 timeout, -3 crash, -2 none.

The dataset is one prompt repeated: the task is the same every time, the model's answers differ.
"""

from rlcore import GRPOConfig, ModelConfig
from rlcore.rewards.code import FunctionWorks, NoCheating, StrategySucceeds

PROMPT = """Write a short Python strategy for the game 2048.

The function receives the current board as a list of lists of ints (0 is an empty cell) and returns the
next move as a single letter: "W" (up), "A" (left), "S" (down) or "D" (right). Use only plain Python and
modules such as math, random, itertools or collections; put any helper functions inside `strategy`.
Answer with the function alone, in a ```python block, in this format:

```python
def strategy(board):
    return "W"  # replace with your logic
```"""

model = ModelConfig(
    model_name_or_path="meta-llama/Meta-Llama-3-8B-Instruct",
    dtype="bfloat16",
    engine="auto",
    lora_r=16,
    lora_alpha=32,
    max_seq_length=1024,
    gpu_memory_utilization=0.9,
    standby=True,
)

config = GRPOConfig(
    output_dir="outputs/game2048",
    learning_rate=5e-5,
    weight_decay=0.01,
    warmup_ratio=0.1,
    lr_scheduler_type="linear",
    max_grad_norm=1.0,
    num_generations=4,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    max_prompt_length=256,
    max_completion_length=768,
    temperature=1.0,
    max_steps=1000,
    save_steps=100,
    logging_steps=1,
)

# A fresh game per step (seed=None), shared by all completions of that step so they compete on the same
# board. The 6x6 board makes 2048 reachable for a decent strategy within the 5-second limit.
rewards = [
    FunctionWorks(),
    NoCheating(),
    StrategySucceeds(size=6, target=2048, seed=None, time_limit=5.0),
]

# Applied with --set model=tiny: the whole loop on a CPU in a few minutes (a random model writes no
# function, so the rewards are the "no function" values; this checks the plumbing, not the learning).
tiny = {
    "engine": "hf",
    "cpu_threads": 1,  # the tiny model's matrices are too small to split across threads
    "dtype": "float32",
    "output_dir": "outputs/game2048-tiny",
    "learning_rate": 5e-4,
    "lr_scheduler_type": "constant",
    "warmup_ratio": 0.0,
    "num_generations": 2,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_prompt_length": 256,
    "max_completion_length": 64,
    "max_steps": 2,
    "save_steps": 2,
}


def dataset(source: str | None = None) -> list[dict]:
    """The 2048 prompt as a chat message, repeated (``source`` may give the number of rows; default 100)."""
    rows = 100
    if source is not None:
        try:
            rows = int(source)
        except ValueError:
            raise ValueError(f"game2048 dataset: 'dataset' must be a number of rows, got {source!r}") from None
        if rows < 1:
            raise ValueError(f"game2048 dataset: 'dataset' must be a number of rows >= 1, got {rows}")
    return [{"prompt": [{"role": "user", "content": PROMPT}]} for _ in range(rows)]
