"""The CPU-checkable parts of ``benchmarks/learning_gpu.py`` and ``benchmarks/learning_trl.py``.

``--runs`` parsing; TRL 1.16's GRPOConfig built from ``examples/arithmetic_grpo.py``'s settings, with the
comparison that must find any setting the two runs differ in; TRL generating for rlcore's prompts step by step
(rlcore's real ``training_step`` against TRL's real train dataloader); rlcore's rewards as TRL reward functions, called
as TRL's GRPOTrainer calls them; the per-step recorder TRL's run uses, driven by transformers' own
TrainerState/TrainerControl; and the whole benchmark's CPU smoke run (rlcore's HF engine and TRL side by side).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import learning_gpu
from learning_gpu import ACCURACY, EXAMPLE, RunSpec, parse_run

trl = pytest.importorskip("trl")
import learning_trl

warnings.filterwarnings("ignore", category=FutureWarning)


# ------------------------------------------------------------------------------------------------ --runs
@pytest.mark.parametrize("name, engine, dtype, graphs, framework", [
    ("vllm", "vllm", "bfloat16", False, "rlcore"),
    ("vllm-float8", "vllm", "float8", False, "rlcore"),
    ("vllm-float16", "vllm", "float16", False, "rlcore"),
    ("vllm-bfloat16", "vllm", "bfloat16", False, "rlcore"),
    ("vllm-graphs", "vllm", "bfloat16", True, "rlcore"),
    ("vllm-float8-graphs", "vllm", "float8", True, "rlcore"),
    ("hf", "hf", "bfloat16", False, "rlcore"),
    ("hf-float16", "hf", "float16", False, "rlcore"),
    ("trl", "trl", "bfloat16", False, "trl"),
])
def test_parse_run_valid(name, engine, dtype, graphs, framework):
    spec = parse_run(name)
    assert spec == RunSpec(name, engine, dtype, graphs)
    assert spec.framework == framework
    # the label names what ran: TRL, vLLM with or without graphs, or transformers; a non-default dtype
    assert ("TRL" in spec.label) == (engine == "trl")
    assert ("CUDA graphs" in spec.label) == graphs
    assert (dtype in spec.label) == (dtype != "bfloat16")


@pytest.mark.parametrize("name", ["foo", "vllm-int4", "hf-graphs", "trl-float16", "hf-float8", "trl-graphs",
                                  "", "vllm-", "VLLM", "vllm-float16-float8"])
def test_parse_run_invalid_names_the_run(name):
    with pytest.raises(ValueError) as caught:
        parse_run(name)
    assert repr(name) in str(caught.value)


@pytest.mark.parametrize("runs, message", [("hf,foo", "'foo'"), ("hf,hf", "named twice")])
def test_bad_runs_stop_before_any_work(runs, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as caught:
        learning_gpu.main(["--smoke", "--runs", runs, "--out", str(out), "--work-dir", str(tmp_path / "work")])
    assert "--runs" in str(caught.value.code) and message in str(caught.value.code)
    assert not out.exists()  # nothing was built or written


# ------------------------------------------------------------------------------------- TRL's settings
@pytest.fixture(scope="module")
def example():
    from rlcore.run import load_example

    return load_example(EXAMPLE)


def _configs(example, tmp_path, model_changes=None, grpo_changes=None):
    model_config = example.model.replace(**(model_changes or {}))
    grpo_config = example.config.replace(output_dir=str(tmp_path / "run"), **(grpo_changes or {}))
    return model_config, grpo_config


def _trl_args(model_config, grpo_config, rewards, tmp_path, smoke):
    extra = {} if smoke else {"use_cpu": True}  # the GPU settings (vLLM colocate, bf16), constructed on a CPU
    try:
        return learning_trl.trl_arithmetic_config(model_config, grpo_config, rewards, str(tmp_path / "trl"),
                                                  smoke=smoke, **extra)
    except (ImportError, ValueError) as error:
        if smoke or "vllm" not in str(error).lower():
            raise
        pytest.skip(f"TRL 1.16 does not construct a use_vllm GRPOConfig without vLLM here: {error}")


@pytest.mark.parametrize("smoke", [True, False], ids=["smoke", "gpu-settings"])
def test_trl_config_carries_the_example_settings(example, tmp_path, smoke):
    model_config, grpo_config = _configs(example, tmp_path)
    args = _trl_args(model_config, grpo_config, example.rewards, tmp_path, smoke)
    lora = learning_trl.trl_lora_config(model_config)
    assert learning_trl.setting_mismatches(model_config, grpo_config, example.rewards, args, lora) == []
    # independently of the comparison: the values that make the two runs the same run
    assert args.learning_rate == 1e-3 and args.num_generations == 8 and args.per_device_train_batch_size == 128
    assert args.max_completion_length == 64 and args.loss_type == grpo_config.loss_type
    assert args.reward_weights == [1.0, 0.2]
    assert (lora.r, lora.lora_alpha) == (16, 32)
    assert sorted(lora.target_modules) == sorted(model_config.target_modules)
    assert args.use_vllm is not smoke
    if not smoke:
        assert args.vllm_mode == "colocate" and args.vllm_enable_sleep_mode is True and args.bf16
        assert args.vllm_gpu_memory_utilization == 0.25 and args.vllm_max_model_length == 512


# (rlcore setting, a valid other value, the name setting_mismatches reports it under)
GRPO_CHANGES = [
    ("learning_rate", 5e-4, "learning_rate"),
    ("loss_type", "grpo", "loss_type"),
    ("num_iterations", 2, "num_iterations"),
    ("temperature", 0.7, "temperature"),
    ("max_completion_length", 32, "max_completion_length"),
    ("beta", 0.04, "beta"),
    ("scale_rewards", "batch", "scale_rewards"),
    ("epsilon_high", 0.28, "epsilon_high"),
    ("min_p", 0.05, "min_p"),
    ("warmup_ratio", 0.1, "warmup (ratio of the steps)"),
    # loss settings both GRPOConfigs have under the same name and meaning
    ("delta", 1.5, "delta"),
    ("sapo_temperature_neg", 2.0, "sapo_temperature_neg"),
    ("off_policy_mask_threshold", 0.5, "off_policy_mask_threshold"),
    ("use_bias_correction_kl", False, "use_bias_correction_kl"),
    ("vllm_importance_sampling_clip_min", 0.5, "vllm_importance_sampling_clip_min"),
]


@pytest.mark.parametrize("field, value, reported", GRPO_CHANGES, ids=[c[0] for c in GRPO_CHANGES])
def test_a_changed_grpo_setting_is_found_and_carried(example, tmp_path, field, value, reported):
    model_config, grpo_config = _configs(example, tmp_path)
    lora = learning_trl.trl_lora_config(model_config)
    before = _trl_args(model_config, grpo_config, example.rewards, tmp_path, smoke=True)
    changed = grpo_config.replace(**{field: value})
    assert getattr(changed, field) != getattr(grpo_config, field)
    found = learning_trl.setting_mismatches(model_config, changed, example.rewards, before, lora)
    assert reported in [name for name, _, _ in found], f"{field} changed in rlcore only, not reported: {found}"
    # and trl_arithmetic_config hands the changed value to TRL
    after = _trl_args(model_config, changed, example.rewards, tmp_path, smoke=True)
    assert learning_trl.setting_mismatches(model_config, changed, example.rewards, after, lora) == []


@pytest.mark.parametrize("field, value, reported", [
    ("lora_r", 8, "lora r"), ("lora_alpha", 64, "lora alpha"), ("lora_dropout", 0.1, "lora dropout"),
    ("target_modules", ["q_proj", "v_proj"], "lora targets"),
])
def test_a_changed_lora_setting_is_found(example, tmp_path, field, value, reported):
    model_config, grpo_config = _configs(example, tmp_path)
    args = _trl_args(model_config, grpo_config, example.rewards, tmp_path, smoke=True)
    lora = learning_trl.trl_lora_config(model_config)
    changed = model_config.replace(**{field: value})
    found = learning_trl.setting_mismatches(changed, grpo_config, example.rewards, args, lora)
    assert [name for name, _, _ in found] == [reported]
    assert learning_trl.setting_mismatches(changed, grpo_config, example.rewards, args,
                                           learning_trl.trl_lora_config(changed)) == []


def test_a_changed_reward_weight_is_found(example, tmp_path):
    from rlcore.rewards import CorrectAnswer, FormatReward

    model_config, grpo_config = _configs(example, tmp_path)
    args = _trl_args(model_config, grpo_config, example.rewards, tmp_path, smoke=True)
    lora = learning_trl.trl_lora_config(model_config)
    heavier = [CorrectAnswer(), FormatReward(weight=0.5)]
    found = learning_trl.setting_mismatches(model_config, grpo_config, heavier, args, lora)
    assert found == [("reward weights", [1.0, 0.5], [1.0, 0.2])]


@pytest.mark.parametrize("field, value, reported", [
    ("standby", False, "engine releases memory between phases"), ("max_seq_length", 1024, "max_model_len"),
    ("dtype", "float16", "bf16"),
])
def test_a_changed_engine_setting_is_found(example, tmp_path, field, value, reported):
    model_config, grpo_config = _configs(example, tmp_path)
    args = _trl_args(model_config, grpo_config, example.rewards, tmp_path, smoke=False)
    lora = learning_trl.trl_lora_config(model_config)
    changed = model_config.replace(**{field: value})
    found = learning_trl.setting_mismatches(changed, grpo_config, example.rewards, args, lora)
    assert [name for name, _, _ in found] == [reported]


def test_a_changed_trl_setting_is_found(example, tmp_path):
    model_config, grpo_config = _configs(example, tmp_path)
    lora = learning_trl.trl_lora_config(model_config)
    args = learning_trl.trl_arithmetic_config(model_config, grpo_config, example.rewards, str(tmp_path / "trl"),
                                              smoke=True, num_generations=4, adam_beta2=0.99, shuffle_dataset=True)
    found = {name.split(" ")[0]: (ours, theirs) for name, ours, theirs in
             learning_trl.setting_mismatches(model_config, grpo_config, example.rewards, args, lora)}
    # TRL shuffling its rows again would undo rlcore's order, which they come in
    assert found == {"num_generations": (8, 4), "adam_beta2": (0.999, 0.99), "shuffle_dataset": (False, True)}


# ------------------------------------------------------------------------------------ the prompt order
class _Generated(Exception):
    """Raised where rlcore's trainer would start generating: the prompts were recorded, nothing is generated."""


def _rlcore_step_prompts(trainer, steps: int) -> list[list[int]]:
    """The dataset rows rlcore's real ``training_step(k)`` hands the engine for the generation step k reads."""
    recorded: list[list[int]] = []

    def record(generation, round_index, prompt_rows):
        recorded.append(list(prompt_rows))
        raise _Generated

    trainer._generate_round = record
    for step in range(steps):
        with pytest.raises(_Generated):
            trainer.training_step(step)
    assert len(recorded) == steps
    return recorded


def _trl_step_prompts(trainer, steps: int) -> list[list[dict]]:
    """The rows TRL 1.16 generates for at the first micro-step of each optimizer step, from its real train
    dataloader: micro-step m gets batch m; it generates every steps_per_generation × num_iterations micro-steps
    from that micro-step's batch (``GRPOTrainer._prepare_inputs``); optimizer step k runs micro-steps
    [k·A, (k+1)·A) with A = gradient_accumulation_steps."""
    args = trainer.args
    generate_every = args.steps_per_generation * args.num_iterations
    batches = []
    for batch in trainer.get_train_dataloader():
        batches.append(batch)
        if len(batches) > (steps - 1) * args.gradient_accumulation_steps:
            break
    prompts = []
    for step in range(steps):
        micro = step * args.gradient_accumulation_steps
        prompts.append(batches[micro - micro % generate_every])
    return prompts


def _key(row: dict) -> str:
    return json.dumps(row, sort_keys=True)


@pytest.fixture(scope="module")
def tiny_model_path():
    from rlcore.tiny_model import build_tiny_model

    return build_tiny_model()


def _both_trainers(example, tmp_path, tiny_model_path, rows, grpo_changes, trl_rows=None, **trl_extra):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOTrainer as TRLTrainer

    from rlcore import ModelConfig
    from rlcore.trainer import GRPOTrainer

    grpo_config = example.config.replace(output_dir=str(tmp_path / "run"), seed=42, gradient_checkpointing=False,
                                         **grpo_changes)
    ours = GRPOTrainer(ModelConfig(model_name_or_path=tiny_model_path, engine="hf", dtype="float32"),
                       reward_funcs=example.rewards, args=grpo_config, train_dataset=rows, show_progress=False)
    args = learning_trl.trl_arithmetic_config(example.model, grpo_config, example.rewards, str(tmp_path / "trl"),
                                              smoke=True, **trl_extra)
    if trl_rows is None:
        trl_rows = learning_trl.trl_train_rows(rows, grpo_config)
    theirs = TRLTrainer(model=tiny_model_path, reward_funcs=[learning_trl.as_trl_reward(r) for r in example.rewards],
                        args=args, train_dataset=Dataset.from_list(trl_rows),
                        processing_class=AutoTokenizer.from_pretrained(tiny_model_path, padding_side="left"),
                        peft_config=learning_trl.trl_lora_config(example.model))
    return ours, theirs


# (case, how many training rows, rlcore settings): the benchmark's run; a dataset so short that the steps cross
# three epochs (40 rows, 16 prompts a generation: 8 rows left out of each epoch, a new permutation each); a
# generation read over four optimizer steps (steps_per_generation=2 × num_iterations=2)
ORDER_CASES = [
    ("benchmark", None, {"max_steps": 200}),
    ("epochs", 40, {"max_steps": 7}),
    ("replayed-generation", 40, {"max_steps": 12, "per_device_train_batch_size": 64, "steps_per_generation": 2,
                                 "num_iterations": 2}),
]


@pytest.mark.parametrize("rows_count, grpo_changes", [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES])
def test_trl_generates_for_rlcores_prompts_step_by_step(example, tmp_path, tiny_model_path, rows_count,
                                                        grpo_changes):
    from collections import Counter

    rows = example.dataset()[:rows_count]
    ours, theirs = _both_trainers(example, tmp_path, tiny_model_path, rows, grpo_changes)
    assert theirs.args.shuffle_dataset is False
    steps = min(ours.total_steps, 12)
    rlcore_prompts = _rlcore_step_prompts(ours, steps)
    trl_prompts = _trl_step_prompts(theirs, steps)
    generation = ours.args.num_generations
    for step, (rlcore_rows, trl_batch) in enumerate(zip(rlcore_prompts, trl_prompts, strict=True)):
        assert len(rlcore_rows) == ours.args.prompts_per_generation
        # TRL's generation batch: each prompt num_generations times in a row
        unique = trl_batch[::generation]
        assert [_key(row) for row in trl_batch] == [_key(row) for row in unique for _ in range(generation)]
        assert Counter(_key(rows[i]) for i in rlcore_rows) == Counter(_key(row) for row in unique), (
            f"step {step}: TRL generates for other prompts than rlcore")
    if rows_count is not None:  # the compared steps cross an epoch, and the next epoch is a new permutation
        per_epoch = len(rows) // ours.args.prompts_per_generation
        by_generation = {ours.schedule.micro_steps_for_optimizer_step(step)[0].generation: prompts
                         for step, prompts in enumerate(rlcore_prompts)}
        assert max(by_generation) >= per_epoch
        assert by_generation[0] != by_generation[per_epoch]


def test_trl_left_to_its_own_shuffle_generates_for_other_prompts(example, tmp_path, tiny_model_path):
    """The step-by-step comparison above can tell the orders apart: TRL's own shuffle of the rows disagrees."""
    from collections import Counter

    rows = example.dataset()
    ours, theirs = _both_trainers(example, tmp_path, tiny_model_path, rows, {"max_steps": 200}, trl_rows=rows,
                                  shuffle_dataset=True)
    rlcore_prompts = _rlcore_step_prompts(ours, 3)
    trl_prompts = _trl_step_prompts(theirs, 3)
    generation = ours.args.num_generations
    assert all(Counter(_key(rows[i]) for i in ours_rows) != Counter(_key(row) for row in batch[::generation])
               for ours_rows, batch in zip(rlcore_prompts, trl_prompts, strict=True))


# --------------------------------------------------------------------------------------- rewards in TRL
def test_rlcore_rewards_as_trl_reward_functions(example):
    from trl.trainer.utils import get_callable_name

    from rlcore.arithmetic import grpo_rows, heldout_problems

    problems = [p for p in heldout_problems(12, seed=0) if p.slipped is not None][:3]
    rows = grpo_rows(problems)
    # per problem: its correct solution, the tutor's slip (wrong final answer), the right number without '#### '
    texts = [text for p in problems for text in (p.solution, p.slipped, f"so it is {p.solution.split()[-1]}")]
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    prompts = [row["prompt"] for row in rows for _ in range(3)]
    columns = {"answer": [row["answer"] for row in rows for _ in range(3)],
               "kind": [row["kind"] for row in rows for _ in range(3)]}
    expected = {"correct_answer": [1.0, 0.0, 1.0] * 3, "format": [1.0, 1.0, 0.0] * 3}
    assert [r.name for r in example.rewards] == list(expected)
    for reward in example.rewards:
        wrapped = learning_trl.as_trl_reward(reward)
        assert wrapped.__name__ == reward.name == get_callable_name(wrapped)  # the name TRL logs it under
        # called as TRL 1.16's GRPOTrainer._calculate_rewards calls a plain function
        scores = wrapped(prompts=prompts, completions=completions, completion_ids=[[1, 2]] * len(texts),
                         **columns, trainer_state=None, log_extra=lambda *a, **k: None,
                         log_metric=lambda *a, **k: None)
        assert list(scores) == expected[reward.name]
        assert list(scores) == list(reward(prompts, completions, **columns))
    right, wrong = (learning_trl.as_trl_reward(example.rewards[0])(prompts[:2], completions[:2],
                                                                   answer=columns["answer"][:2]))
    assert right != wrong


# ------------------------------------------------------------------------------ TRL's per-step recorder
def test_budget_callback_writes_each_step_once_and_stops_at_the_budget(tmp_path):
    from transformers import TrainerControl, TrainerState

    path = tmp_path / "metrics.jsonl"
    evaluated = []

    def evaluate(model):
        evaluated.append(state.global_step)
        return 0.5

    budget = learning_trl.make_budget_callback(seconds=0.0, eval_steps=2, evaluate=evaluate,
                                               metrics_path=str(path))
    state, control = TrainerState(max_steps=8), TrainerControl()
    budget.on_train_begin(None, state, control, model=None)
    state.global_step = 1
    budget.on_step_begin(None, state, control)
    control = budget.on_step_end(None, state, control, model=None)
    assert control.should_training_stop and budget.stopped_by_budget  # any step overruns a 0 s budget
    budget.on_log(None, state, control,
                  logs={"reward": 0.25, "loss": 0.1, "sampling/importance_sampling_ratio/min": 0.9})
    # the end-of-training summary TRL logs at the same step
    budget.on_log(None, state, control, logs={"train_runtime": 1.0, "train_loss": 0.1})
    budget.on_train_end(None, state, control)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert evaluated == [0, 1]  # before the first step and at the step the budget stopped
    assert records[0] == {"step": 0, ACCURACY: 0.5}
    assert records[1]["reward_mean"] == 0.25 and records[1]["sampling_is_min"] == 0.9
    assert records[1][ACCURACY] == 0.5 and records[1]["time_step"] >= 0.0 and "train_runtime" not in records[1]
    assert budget.wall == [(1, budget.train_seconds)]


# --------------------------------------------------------------------------------------- the smoke run
@pytest.mark.slow
def test_smoke_run_rlcore_and_trl_side_by_side(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, os.path.join(BENCHMARKS, "learning_gpu.py"), "--smoke", "--runs", "hf,trl",
               "--max-steps", "4", "--out", str(out), "--work-dir", str(work)]
    env = {**os.environ, "OUT": str(out)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
                          check=False)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]

    metrics = {}
    for run in ("hf", "trl"):
        path = out / f"metrics_{run}.jsonl"
        assert path.is_file(), f"no {path.name}: {sorted(os.listdir(out))}\n{done.stdout[-4000:]}"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in records]
        assert len(steps) == len(set(steps)), f"{path.name} writes a step twice: {steps}"
        assert steps == sorted(steps)
        step0 = [r for r in records if r["step"] == 0 and ACCURACY in r]
        assert step0, f"{path.name}: no held-out accuracy before the first step"
        trained = [r for r in records if r["step"] >= 1 and "reward_mean" in r and "time_step" in r]
        assert trained, f"{path.name}: no training step with reward_mean and time_step"
        assert all(0.0 <= r[ACCURACY] <= 1.0 for r in records if ACCURACY in r)
        metrics[run] = {"step0": step0[0][ACCURACY], "records": records}
    # the same model, the same greedy decoding, the same 32 held-out problems, scored by the same reward
    assert metrics["trl"]["step0"] == metrics["hf"]["step0"]

    summary = json.loads((out / "results.json").read_text())
    assert list(summary["runs"]) == ["hf", "trl"]
    assert summary["runs"]["hf"]["framework"] == "rlcore" and summary["runs"]["trl"]["framework"] == "trl"
    assert all(run["completed"] for run in summary["runs"].values())
    assert summary["runs"]["trl"]["steps"] == max(r["step"] for r in metrics["trl"]["records"])
    # the smoke run trains in float32 on both sides, and the table says so
    assert summary["runs"]["hf"]["dtype"] == summary["runs"]["trl"].get("dtype") == "float32"
    table = (out / "learning_table.md").read_text().splitlines()
    assert [cell.strip() for cell in table[0].strip("|").split("|")] == ["", "hf", "trl"]
    assert table[2].startswith("| held-out accuracy before → after |")
    assert len(table[2].strip("|").split("|")) == 3  # a value for each run
