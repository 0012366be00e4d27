"""GRPO on GSM8K: Llama-3-8B-Instruct learns to solve grade-school math with a verifiable answer reward.

    python -m rlcore.run examples/gsm8k_grpo.py                       # Meta-Llama-3-8B-Instruct, vLLM, GPU
    python -m rlcore.run examples/gsm8k_grpo.py --set model=/path/to/Meta-Llama-3-8B-Instruct
    python -m rlcore.run examples/gsm8k_grpo.py --set model=tiny      # tiny random model, bundled sample, CPU
    python -m rlcore.run examples/gsm8k_grpo.py --set dataset=my_gsm8k.jsonl   # {"question", "answer"} rows

The dataset source is "hub" (openai/gsm8k from the Hugging Face Hub; needs network), "bundled" (the 200
problems shipped with rlcore), or a local .jsonl/.json file of {"question": ..., "answer": ...} rows.
"""

from rlcore import GRPOConfig, ModelConfig
from rlcore.dataset_rows import DatasetError, bundled_gsm8k_path, load_rows
from rlcore.rewards import CorrectAnswer, FormatReward

SYSTEM_PROMPT = ("Solve the math problem. Reason step by step, then write the final answer alone on the last "
                 "line as '#### <number>'.")

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
    output_dir="outputs/gsm8k",
    learning_rate=5e-6,
    adam_beta2=0.99,
    weight_decay=0.1,
    warmup_ratio=0.1,
    lr_scheduler_type="cosine",
    max_grad_norm=0.1,
    num_generations=8,
    per_device_train_batch_size=16,
    gradient_accumulation_steps=4,
    max_prompt_length=256,
    max_completion_length=512,
    max_steps=250,
    save_steps=50,
    logging_steps=1,
)

rewards = [CorrectAnswer(), FormatReward(weight=0.2)]

# Applied with --set model=tiny: a laptop-CPU run of the whole loop in well under 3 minutes.
tiny = {
    "dataset": "bundled",
    "engine": "hf",
    "cpu_threads": 1,  # the tiny model's matrices are too small to split across threads
    "dtype": "float32",
    "output_dir": "outputs/gsm8k-tiny",
    "learning_rate": 5e-4,
    "lr_scheduler_type": "constant",
    "warmup_ratio": 0.0,
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "num_generations": 4,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_prompt_length": 192,
    "max_completion_length": 32,
    "max_steps": 30,
    "save_steps": 10,
}


def dataset(source: str | None = None) -> list[dict]:
    """GSM8K rows as chat prompts with the worked solution kept in ``answer`` for the reward."""
    source = source or "hub"
    if source == "hub":
        try:
            from datasets import load_dataset

            raw = load_dataset("openai/gsm8k", "main", split="train")
        except Exception as error:  # offline, or the Hub refused
            raise DatasetError(f"could not load openai/gsm8k from the Hub ({type(error).__name__}); use "
                               "--set dataset=bundled for the 200 bundled problems or --set dataset=path.jsonl"
                               ) from None
    elif source == "bundled":
        raw = load_rows(bundled_gsm8k_path(), "gsm8k sample")
    else:
        raw = load_rows(source, f"dataset {source}")
    rows = []
    for index, row in enumerate(load_rows(raw, "gsm8k")):
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise DatasetError(f"gsm8k row {index}: field 'question' must be a non-empty string, got {question!r:.60}")
        if not isinstance(answer, str):
            raise DatasetError(f"gsm8k row {index}: field 'answer' must be a string, got {type(answer).__name__}")
        rows.append({"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                                {"role": "user", "content": question}],
                     "answer": answer})
    return rows
