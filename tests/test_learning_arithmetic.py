"""GRPO raises held-out accuracy of a model that knows a little: the arithmetic task of rlcore.arithmetic, at CPU size.

The tiny model is fine-tuned here (cached in rlcore's cache directory after the first build) on solutions from a
tutor who slips on four of six kinds of problem, so greedy decoding starts near the share of clean kinds while
sampling often finds the right answer. GRPO with the HF engine, CorrectAnswer + FormatReward, must raise held-out
greedy accuracy (measured by the trainer at step 0 and at the last step) by MARGIN for two seeds; with a reward
that is a coin flip (same steps, same learning rate) it must not.
"""

from __future__ import annotations

import os
import random
import re

import pytest
from rlcore.rewards import CorrectAnswer, FormatReward

from rlcore import arithmetic
from rlcore.arithmetic import TINY_BUILD, TaskSpec, generate_problems

# Observed on a 2-core CPU (20 steps, 8 prompts x 8 completions, lr 3e-3 decaying linearly), over four tiny builds
# (build seeds 0-2, 300 or 400 fine-tuning steps) and GRPO seeds 0 and 1: held-out greedy accuracy rose by 0.31 to
# 0.62 (e.g. 0.44 → 0.75 and 0.77 for the default build); the coin-flip reward lowered it (0.44 → 0.34).
STEPS = 20
MARGIN = 0.2
HELDOUT = 128


# ---------------------------------------------------------------------------------------------- the task
@pytest.mark.parametrize("kind", arithmetic.KINDS)
def test_solutions_are_correct_and_slips_are_wrong(kind):
    spec = TaskSpec(kinds=(kind,))
    reward = CorrectAnswer()
    for problem in generate_problems(200, seed=7, spec=spec):
        lines = problem.solution.split("\n")
        assert lines[-1] == f"#### {problem.answer}" and problem.answer >= 0
        # every "x op y = z" in the reasoning is true arithmetic (checked by Python, not by the generator)
        equations = re.findall(r"(\d+) ([-+x/]) (\d+) = (\d+)", problem.solution)
        assert equations, problem.solution
        for left, op, right, result in equations:
            value = {"+": int.__add__, "-": int.__sub__, "x": int.__mul__, "/": int.__floordiv__}[op](int(left),
                                                                                                    int(right))
            assert value == int(result) and (op != "/" or int(left) % int(right) == 0), problem.solution
        assert int(equations[-1][3]) == problem.answer
        assert reward(None, [problem.solution], answer=[problem.solution]) == [1.0]
        assert FormatReward()(None, [problem.solution]) == [1.0]
        if kind in arithmetic.SLOPPY_KINDS:
            # the tutor's slip gives a wrong final answer in the right format
            assert reward(None, [problem.slipped], answer=[problem.solution]) == [0.0], problem
            assert FormatReward()(None, [problem.slipped]) == [1.0]
        else:
            assert problem.slipped is None


def test_problems_are_seeded_and_held_out_ones_never_train():
    spec = TaskSpec()
    assert generate_problems(50, 3, spec) == generate_problems(50, 3, spec)
    assert generate_problems(50, 3, spec) != generate_problems(50, 4, spec)
    heldout = arithmetic.heldout_problems(300, seed=0, spec=spec)
    train = arithmetic.grpo_problems(3000, seed=0, spec=spec, heldout=heldout)
    assert not {p.question for p in heldout} & {p.question for p in train}
    kinds = [p.kind for p in heldout]
    assert {kinds.count(k) for k in arithmetic.KINDS} == {50}  # kinds in turn


def test_tutor_slips_at_the_given_rate_on_sloppy_kinds_only():
    spec = TaskSpec(slip_probability=0.6)
    rng = random.Random(0)
    problems = generate_problems(3000, 11, spec)
    slipped = {k: [] for k in arithmetic.KINDS}
    for problem in problems:
        slipped[problem.kind].append(arithmetic.tutor_solution(problem, rng, spec) != problem.solution)
    for kind, flags in slipped.items():
        rate = sum(flags) / len(flags)
        if kind in arithmetic.SLOPPY_KINDS:
            assert abs(rate - 0.6) < 0.06, (kind, rate)  # 500 draws: 5 standard deviations is 0.11
        else:
            assert rate == 0.0, kind


@pytest.mark.parametrize("field, value, message", [
    ("max_number", 1, "TaskSpec.max_number=1"), ("slip_probability", 1.5, "TaskSpec.slip_probability=1.5"),
    ("kinds", ("buy_give", "juggling"), "unknown kinds ['juggling']"), ("kinds", (), "TaskSpec.kinds is empty"),
])
def test_task_spec_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TaskSpec(**{field: value})


def test_learning_rate_schedule_formula():
    lr = arithmetic.learning_rate_at
    assert lr(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)  # warm-up: (step + 1) / warmup
    assert lr(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr(10, 100, 1.0, 10, 0.1) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr(55, 100, 1.0, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: the mean of peak and floor
    assert lr(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def tiny_model() -> str:
    return arithmetic.build_arithmetic_model(settings=TINY_BUILD, device="cpu")


def test_model_directory_loads_like_a_llama3_checkpoint(tiny_model):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(tiny_model, "config.json")) as handle:
        config = json.load(handle)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "bfloat16"
    rope_theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))  # transformers 5 / 4
    assert rope_theta == 500000.0 and config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["max_position_embeddings"] >= 2048 and not config["tie_word_embeddings"]
    with open(os.path.join(tiny_model, "generation_config.json")) as handle:
        generation = json.load(handle)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    assert tokenizer.eos_token == "<|eot_id|>" and len(tokenizer) == config["vocab_size"]
    messages = arithmetic.chat_prompt("What is 2 + 2?")
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == arithmetic.render_prompt(messages)
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert os.path.isfile(os.path.join(tiny_model, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert model.config.vocab_size == len(tokenizer)


def test_fine_tuned_model_leaves_room_to_learn(tiny_model):
    report = arithmetic.read_build_report(tiny_model)
    greedy, sampled = report["heldout_greedy_accuracy"], report["heldout_sampled"]
    print(f"\ntiny build: {report['sft']['steps']} steps in {report['sft']['seconds']:.0f} s, greedy {greedy:.3f}, "
          f"T=1 mean {sampled['mean']:.3f}, pass@8 {sampled['pass@8']:.3f}")
    assert 0.15 <= greedy <= 0.5
    assert sampled["pass@8"] >= greedy + 0.2  # the right answer is often within reach of sampling


def test_example_tiny_preset_points_at_the_tiny_build(tiny_model):
    from rlcore.run import load_example, resolve

    example = load_example(os.path.join(os.path.dirname(__file__), "..", "examples", "arithmetic_grpo.py"))
    model_config, _, _ = resolve(example, {"model": "tiny"})
    assert model_config.model_name_or_path == tiny_model and model_config.engine == "hf"
    model_config, _, _ = resolve(example, {"model": "/some/dir"})
    assert model_config.model_name_or_path == "/some/dir"


# ------------------------------------------------------------------------------------------------ learning
class CoinFlip:
    """A reward with no information: each completion scores 0 or 1 at random."""

    __name__ = "coin_flip"

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def __call__(self, prompts, completions, **columns):
        return [float(self.rng.random() < 0.5) for _ in completions]


def grpo_accuracy(tiny_model: str, tmp_path, seed: int, rewards) -> tuple[float, float]:
    """Held-out greedy accuracy at step 0 and at the last step of a GRPO run with the HF engine."""
    from rlcore import GRPOConfig, ModelConfig
    from rlcore.reporting import read_metrics
    from rlcore.trainer import GRPOTrainer

    heldout = arithmetic.heldout_problems(HELDOUT, seed=0)
    rows = arithmetic.grpo_rows(arithmetic.grpo_problems(512, seed=0, heldout=heldout))
    config = GRPOConfig(output_dir=str(tmp_path / f"seed{seed}"), num_generations=8, per_device_train_batch_size=64,
                        max_prompt_length=128, max_completion_length=48, learning_rate=3e-3,
                        lr_scheduler_type="linear", max_steps=STEPS, eval_steps=STEPS, save_steps=STEPS,
                        per_device_eval_batch_size=HELDOUT, gradient_checkpointing=False, seed=seed)
    trainer = GRPOTrainer(ModelConfig(model_name_or_path=tiny_model, engine="hf", dtype="float32", lora_r=16,
                                      lora_alpha=32), reward_funcs=rewards, args=config, train_dataset=rows,
                          eval_dataset=arithmetic.grpo_rows(heldout), show_progress=False)
    records = read_metrics(trainer.train()["metrics_file"])
    accuracy = [(r["step"], r["eval_rewards/correct_answer"]) for r in records
                if "eval_rewards/correct_answer" in r]
    assert [step for step, _ in accuracy] == [0, STEPS]
    rewards_seen = [r["reward_mean"] for r in records if "reward_mean" in r]
    print(f"\nseed {seed}, {[getattr(r, 'name', None) or r.__name__ for r in rewards]}: held-out accuracy "
          f"{accuracy[0][1]:.3f} → {accuracy[1][1]:.3f}; train reward first 5 {sum(rewards_seen[:5]) / 5:.3f}, "
          f"last 5 {sum(rewards_seen[-5:]) / 5:.3f}")
    return accuracy[0][1], accuracy[1][1]


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_raises_heldout_accuracy(tiny_model, tmp_path, seed):
    before, after = grpo_accuracy(tiny_model, tmp_path, seed, [CorrectAnswer(), FormatReward(weight=0.2)])
    assert after >= before + MARGIN, f"seed {seed}: held-out accuracy {before:.3f} → {after:.3f}"


def test_coin_flip_reward_does_not_reach_the_margin(tiny_model, tmp_path):
    # CorrectAnswer with weight 0 only reports held-out accuracy; the coin flip is the whole training signal
    before, after = grpo_accuracy(tiny_model, tmp_path, 0, [CorrectAnswer(weight=0.0), CoinFlip(seed=5)])
    assert after < before + MARGIN, f"an uninformative reward moved held-out accuracy {before:.3f} → {after:.3f}"
