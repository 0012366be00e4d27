"""The whole loop on the tiny model: metrics, plot, adapter, exact resume, continued training, export."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rlcore import GRPOConfig, ModelConfig
from rlcore.checkpoint import list_checkpoints
from rlcore.reporting import read_metrics
from rlcore.rewards import RewardFunction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DigitShare(RewardFunction):
    """Share of completion characters that are digits: a dense, verifiable reward."""

    def __call__(self, prompts, completions, **columns):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


ROWS = [{"prompt": f"Write the number {n} and more numbers:"} for n in range(32)]


def small_config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "run"), num_generations=4, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, max_completion_length=12, max_prompt_length=64,
                  learning_rate=1e-3, max_steps=4, save_steps=2, seed=3, logging_steps=1,
                  gradient_checkpointing=False)
    values.update(overrides)
    return GRPOConfig(**values)


def make_trainer(config, **kwargs):
    from rlcore.trainer import GRPOTrainer

    model = kwargs.pop("model", ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32"))
    return GRPOTrainer(model, reward_funcs=[DigitShare()], args=config, train_dataset=ROWS,
                       show_progress=False, **kwargs)


def test_training_writes_metrics_plot_and_peft_adapter(tmp_path):
    config = small_config(tmp_path, beta=0.04, num_iterations=2)
    trainer = make_trainer(config)
    summary = trainer.train()
    records = read_metrics(summary["metrics_file"])
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("reward_mean", "reward_std", "rewards/digit_share/mean", "completion_length_mean",
                "completion_length_min", "completion_length_max", "truncated_fraction", "kl", "loss",
                "time_generate", "time_reward", "time_train", "tokens_per_second", "peak_memory_gib",
                "mismatch_logp_diff_mean", "mismatch_kl", "grad_norm", "learning_rate"):
        assert key in records[-1], key
    assert any(k.startswith("clip_ratio") for k in records[-1])
    # the generation's mismatch is computed once and logged under one name
    assert records[-1]["mismatch_logp_diff_mean"] == trainer.buffers[max(trainer.buffers)].mismatch["logp_diff_mean"]
    assert not [k for k in records[-1] if k.startswith("sampling_is_") and "logp" in k]
    assert summary["steps_run"] == 4 and summary["resumed_from"] is None
    assert os.path.isfile(summary["plot"])
    checkpoints = list_checkpoints(config.output_dir)
    assert [os.path.basename(c) for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert not [n for n in os.listdir(config.output_dir) if n.endswith(".tmp")]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlcore.tiny_model import build_tiny_model

    base = AutoModelForCausalLM.from_pretrained(build_tiny_model())
    loaded = PeftModel.from_pretrained(base, os.path.join(checkpoints[-1], "adapter"))
    trained = {k: v for k, v in make_trainer(config).model.state_dict().items() if "lora_" in k}
    assert trained and all(k in loaded.state_dict() for k in trained)


def test_hf_engine_generation_matches_training_logprobs(tmp_path, caplog):
    # With no sampling filters the engine's sampling logprobs and the trainer's are the same distribution.
    with caplog.at_level("WARNING", logger="rlcore"):
        summary = make_trainer(small_config(tmp_path, max_steps=1)).train()
    record = read_metrics(summary["metrics_file"])[0]
    assert record["mismatch_logp_diff_mean"] < 1e-4
    assert record["grad_norm"] > 0 and not [r for r in caplog.records if "gradient is exactly 0" in r.getMessage()]


RESUME_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from test_trainer import make_trainer, small_config
    import pathlib
    import torch

    torch.set_num_threads({threads})  # float reductions depend on the thread count: match the parent's

    def crash_after(trainer, step, metrics):
        if step == {crash_step}:
            os._exit(17)  # a hard kill: no cleanup, no final save

    trainer = make_trainer(small_config(pathlib.Path({tmp!r}), max_steps=6, save_steps=3),
                           callbacks=[crash_after])
    trainer.train()
""")


@pytest.mark.parametrize("overrides", [{"beta": 0.04}, {"beta": 0.04, "steps_per_generation": 4, "num_iterations": 2}])
def test_resume_after_kill_reproduces_losses(tmp_path, overrides):
    # The crashing run gets the same overrides through a small wrapper module argument.
    full = make_trainer(small_config(tmp_path / "full", max_steps=6, save_steps=3, **overrides)).train()
    expected = read_metrics(full["metrics_file"])

    crashed = tmp_path / "crashed"
    script = RESUME_SCRIPT.format(tests=os.path.join(ROOT, "tests"), crash_step=4, tmp=str(crashed),
                                  threads=torch.get_num_threads())
    script = script.replace("max_steps=6, save_steps=3", "max_steps=6, save_steps=3, **" + repr(overrides))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 17, result.stderr[-2000:]
    run_dir = crashed / "run"
    assert [os.path.basename(c) for c in list_checkpoints(str(run_dir))] == ["checkpoint-3"]
    assert [r["step"] for r in read_metrics(str(run_dir / "metrics.jsonl"))] == [1, 2, 3, 4]

    resumed = make_trainer(small_config(crashed, max_steps=6, save_steps=3, **overrides)).train(
        resume_from_checkpoint=True)
    assert (resumed["first_step"], resumed["steps_run"]) == (3, 3)
    records = read_metrics(resumed["metrics_file"])
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "reward_mean", "kl"):
        assert [r[key] for r in records] == pytest.approx([r[key] for r in expected], abs=1e-6), key
    assert len({round(r["loss"], 6) for r in expected}) > 1  # the run really changed between steps


def test_continued_training_from_adapter_and_merged_export(tmp_path):
    first = make_trainer(small_config(tmp_path / "a", max_steps=2, save_steps=2))
    first.train()
    adapter = os.path.join(list_checkpoints(first.args.output_dir)[-1], "adapter")
    second = make_trainer(small_config(tmp_path / "b", max_steps=1),
                          model=ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32",
                                            lora_adapter_path=adapter))
    before = {k: v.clone() for k, v in second.model.state_dict().items() if "lora_" in k}
    trained = {k: v for k, v in first.model.state_dict().items() if "lora_" in k}
    assert before.keys() == trained.keys()
    for key in before:
        torch.testing.assert_close(before[key], trained[key], rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in before.items() if "lora_B" in k)  # B moved away from zero

    from transformers import AutoModelForCausalLM

    from rlcore.export import save_merged

    merged_dir = save_merged(second.model, second.tokenizer, str(tmp_path / "merged"), dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    second.model.eval()
    with torch.no_grad():
        expected = second.model(input_ids=ids).logits
        actual = merged(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        base_logits = second.model.get_base_model()(input_ids=ids).logits  # LoRA still active: same logits
    torch.testing.assert_close(base_logits, expected)


def test_nonfinite_guard_skips_then_stops(tmp_path):
    from rlcore.trainer import NonFiniteLossError

    trainer = make_trainer(small_config(tmp_path, max_steps=5, max_consecutive_nonfinite=2))
    lora = next(p for n, p in trainer.model.named_parameters() if "lora_A" in n)
    lora.register_hook(lambda grad: grad * float("nan"))  # every backward now yields a NaN gradient
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        trainer.train()
    records = read_metrics(os.path.join(trainer.args.output_dir, "metrics.jsonl"))
    assert [r["update_skipped"] for r in records] == [True]


def test_one_run_per_output_dir(tmp_path):
    from rlcore.output_dir import OutputDirError

    trainer = make_trainer(small_config(tmp_path, max_steps=2, save_steps=1))
    with pytest.raises(OutputDirError, match="holds no checkpoint to resume from"):
        trainer.train(resume_from_checkpoint=True)
    trainer.train()
    run = trainer.args.output_dir
    assert [os.path.basename(c) for c in list_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(OutputDirError, match="is not empty"):
        trainer.train()
    (tmp_path / "run" / "notes.txt").write_text("kept")
    fresh = make_trainer(small_config(tmp_path, max_steps=1, save_steps=1, overwrite_output_dir=True)).train()
    assert fresh["steps_run"] == 1
    # the previous run's checkpoints and metrics are gone; files that are not a run's stay
    assert sorted(os.listdir(run)) == ["checkpoint-1", "metrics.jsonl", "notes.txt", "training_curves.png"]
    assert [r["step"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == [1]


def test_built_module_gets_the_same_training_setup(tmp_path):
    """GRPOTrainer(model=<module>) goes through the same preparation as a model loaded from a ModelConfig."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlcore.kernels.transformers_compat import layer_checkpointing, layer_has_checkpointing_function
    from rlcore.kernels.recompute import decoder_layers
    from rlcore.tiny_model import build_tiny_model
    from rlcore.trainer import GRPOTrainer

    def setup(model, **overrides):
        args = small_config(tmp_path, gradient_checkpointing=True, **overrides)
        if isinstance(model, str):
            trainer = GRPOTrainer(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                                  processing_class=AutoTokenizer.from_pretrained(model), reward_funcs=[DigitShare()],
                                  args=args, train_dataset=ROWS, show_progress=False)
        else:
            trainer = make_trainer(args, model=model)
        layers = decoder_layers(trainer.model)
        return ([layer_has_checkpointing_function(layer) for layer in layers],
                [layer_checkpointing(layer) for layer in layers])

    path = build_tiny_model()
    loaded = ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32")
    for overrides, expected in (({}, [True, True]), ({"activation_memory_gib": 10.0}, [False, False])):
        built = setup(path, **overrides)
        assert built == setup(loaded, **overrides), overrides
        assert built == ([True, True], expected), overrides  # checkpointing installed; memory budget applied


def test_cpu_threads_is_applied_on_the_cpu(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        make_trainer(small_config(tmp_path), model=ModelConfig(model_name_or_path="tiny", engine="hf",
                                                               dtype="float32", cpu_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_zero_gradient_with_learning_signal_warns_once(tmp_path, caplog):
    trainer = make_trainer(small_config(tmp_path, max_steps=2))
    for parameter in trainer.trainable:
        parameter.register_hook(lambda grad: grad * 0.0)  # the updates are dead, as after a saturating step
    with caplog.at_level("WARNING", logger="rlcore"):
        summary = trainer.train()
    warnings = [r for r in caplog.records if "gradient is exactly 0" in r.getMessage()]
    assert len(warnings) == 1 and "learning_rate" in warnings[0].getMessage()
    assert any(b.advantages.abs().sum() > 0 for b in trainer.buffers.values())  # there was something to learn
    assert summary["final_metrics"]["grad_norm"] == 0.0


def test_bad_reward_weights_and_empty_rewards(tmp_path):
    from rlcore.trainer import GRPOTrainer

    with pytest.raises(ValueError, match="reward_weights has 2 entries for 1 reward"):
        make_trainer(small_config(tmp_path, reward_weights=[1.0, 2.0]))
    with pytest.raises(ValueError, match="reward_funcs is empty"):
        GRPOTrainer(ModelConfig(model_name_or_path="tiny", engine="hf"), reward_funcs=[],
                    args=small_config(tmp_path), train_dataset=ROWS)


def test_cli_runs_gsm8k_tiny(tmp_path):
    out = tmp_path / "gsm8k"
    result = subprocess.run(
        [sys.executable, "-m", "rlcore.run", os.path.join(ROOT, "examples", "gsm8k_grpo.py"), "--set", "model=tiny",
         "--set", f"output_dir={out}", "--set", "max_steps=2", "--set", "save_steps=2", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 2 steps in" in result.stdout
    assert os.path.isfile(out / "metrics.jsonl") and os.path.isfile(out / "training_curves.png")
    assert os.path.isfile(out / "checkpoint-2" / "adapter" / "adapter_model.safetensors")
    config = json.loads((out / "checkpoint-2" / "config.json").read_text())
    assert config["grpo"]["max_steps"] == 2
    before = sorted(os.listdir(out))

    def again(*extra):
        return subprocess.run(
            [sys.executable, "-m", "rlcore.run", os.path.join(ROOT, "examples", "gsm8k_grpo.py"), "--set",
             "model=tiny", "--set", f"output_dir={out}", "--set", "save_steps=2", "--no-progress", *extra],
            capture_output=True, text=True, timeout=600, cwd=str(tmp_path))

    # a rerun into the same directory is refused (it would mix two runs), and changes nothing
    refused = again("--set", "max_steps=1")
    assert refused.returncode == 2 and "is not empty" in refused.stderr and "--resume" in refused.stderr
    assert sorted(os.listdir(out)) == before
    # --resume continues the run; "done" counts the steps run now
    resumed = again("--set", "max_steps=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "done: 1 step (steps 3-3, resumed from checkpoint-2)" in resumed.stdout


@pytest.mark.parametrize("args, message", [
    (["--set", "model=/nonexistent/model-dir"], "no such directory"),
    (["--set", "model=tiny", "--set", "lerning_rate=1"], "did you mean learning_rate"),
    (["--set", "model=tiny", "--set", "num_generations=1"], "num_generations=1 is not allowed"),
])
def test_cli_errors_are_one_clear_line(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "rlcore.run", os.path.join(ROOT, "examples", "gsm8k_grpo.py"), *args,
         "--set", "dataset=bundled", "--set", f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_cli_bad_dataset_row_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n"
                    + json.dumps({"question": "2+2?", "answer": 4}) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "rlcore.run", os.path.join(ROOT, "examples", "gsm8k_grpo.py"), "--set", "model=tiny",
         "--set", f"dataset={path}", "--set", f"output_dir={tmp_path / 'o'}"],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 2
    assert "row 1: field 'answer' must be a string" in result.stderr


def test_eval_every_n_steps_reports_greedy_reward(tmp_path):
    from rlcore.trainer import GRPOTrainer

    config = small_config(tmp_path, max_steps=4, eval_steps=2, per_device_eval_batch_size=3)
    trainer = GRPOTrainer(ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32"),
                          reward_funcs=[DigitShare()], args=config, train_dataset=ROWS, eval_dataset=ROWS[:5],
                          show_progress=False)
    records = read_metrics(trainer.train()["metrics_file"])
    # step 0: the evaluation before any update
    assert [(r["step"], "eval_reward_mean" in r) for r in records] == [(0, True), (1, False), (2, True), (3, False),
                                                                       (4, True)]
    # greedy decoding: evaluating the same adapter twice gives the same score
    assert trainer.evaluate() == trainer.evaluate()
    assert 0.0 <= records[-1]["eval_reward_mean"] <= 1.0
