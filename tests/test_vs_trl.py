"""The CPU-checkable parts of ``benchmarks/vs_trl.py`` (rlcore vs TRL 1.16 colocate on one GPU).

Identical settings (both frameworks' configs built by the benchmark's own builders and compared field by
field, and prompts tokenized by each framework's own code), the random-weight writer against transformers'
Llama, the measuring instruments (phase clock, memory sampler, step recorder: with TRL's real Trainer loop and
rlcore's real trainer on the tiny model), synthetic rollouts parsed by both frameworks' vLLM-output readers,
the summary/table code and the bounded longest-length search.
"""

import hashlib
import json
import os
import sys
import warnings
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import vs_trl  # noqa: E402
import vs_trl_measure as measure  # noqa: E402
import vs_trl_report as report  # noqa: E402
import vs_trl_setup as setup  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
trl = pytest.importorskip("trl")


def _tiny():
    return setup._rlcore_model_helpers().build_tiny_model()


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tiny())


def _both(setting, **trl_extra):
    model_config, grpo_config = setup.rlcore_configs(setting, "/tmp/vs-trl-model", "/tmp/vs-trl-out", 6)
    trl_config = setup.trl_config(setting, "/tmp/vs-trl-out", 6, use_cpu=True, **trl_extra)
    return model_config, grpo_config, trl_config, setup.trl_lora_config()


# ---------------------------------------------------------------------- identical settings
@pytest.mark.parametrize("setting", [*setup.SETTINGS.values(), setup.probe_setting(32768)], ids=lambda s: s.name)
def test_both_frameworks_get_identical_settings(setting):
    model_config, grpo_config, trl_config, lora = _both(setting)
    assert setup.setting_mismatches(model_config, grpo_config, trl_config, lora) == []
    # what the comparison is about, read back from each framework's own config object
    for config in (grpo_config, trl_config):
        assert config.num_generations == setting.num_generations == 8
        assert config.generation_batch_size == setting.num_prompts * 8
        assert config.per_device_train_batch_size == setting.micro_batch
        assert config.max_completion_length == setting.completion_length
        assert config.loss_type == "dapo" and config.learning_rate == 1e-6
        assert config.vllm_importance_sampling_correction is True
        assert config.gradient_checkpointing is True
    assert (model_config.lora_r, model_config.lora_alpha, sorted(model_config.target_modules)) == \
        (lora.r, lora.lora_alpha, sorted(lora.target_modules)) == (16, 32, sorted(setup.LORA_TARGETS))
    assert model_config.dtype == "bfloat16" and trl_config.bf16 is True
    assert model_config.max_seq_length == trl_config.vllm_max_model_length == setting.prompt_length + \
        setting.completion_length
    assert grpo_config.max_prompt_length == setting.prompt_length  # prompts are exactly this long: no truncation
    assert (trl_config.use_vllm, trl_config.vllm_mode, trl_config.vllm_enable_sleep_mode) == (True, "colocate", True)
    assert trl_config.generation_kwargs == {"ignore_eos": True}
    assert model_config.engine == "vllm" and model_config.standby and model_config.kernels
    assert model_config.load_format == "safetensors"  # the same files TRL loads, not dummy weights


def test_a_different_setting_is_reported():
    setting = setup.SETTINGS["16x8x512"]
    model_config, grpo_config, trl_config, lora = _both(setting, learning_rate=2e-6, loss_type="grpo")
    lora.r = 8
    found = {name: (ours, theirs) for name, ours, theirs in
             setup.setting_mismatches(model_config, grpo_config, trl_config, lora)}
    assert found == {"learning_rate": (1e-6, 2e-6), "loss_type": ("dapo", "grpo"), "lora r": (16, 8)}


def test_probe_setting_trains_one_micro_batch_of_the_group():
    probe = setup.probe_setting(65536)
    _, grpo_config, trl_config, _ = _both(probe)
    for config in (grpo_config, trl_config):
        assert (config.steps_per_generation, config.gradient_accumulation_steps) == (8, 1)
        assert config.per_device_train_batch_size == 1 and config.max_completion_length == 65536


def test_setting_rejects_bad_shapes():
    with pytest.raises(ValueError, match="micro_batch"):
        setup.Setting("x", num_prompts=3, num_generations=2, completion_length=8, micro_batch=4)
    with pytest.raises(ValueError, match="num_generations"):
        setup.Setting("x", num_prompts=1, num_generations=1, completion_length=8, micro_batch=1)


def test_rlcore_overrides_are_applied_or_named():
    setting = setup.SETTINGS["16x8x512"]
    model_config, grpo_config = setup.rlcore_configs(setting, "/m", "/o", 2, overrides={
        "activation_memory_gib": 30.0, "enforce_eager": True})
    assert grpo_config.activation_memory_gib == 30.0 and model_config.enforce_eager is True
    with pytest.raises(ValueError, match="'no_such_field'"):
        setup.rlcore_configs(setting, "/m", "/o", 2, overrides={"no_such_field": 1})


# ---------------------------------------------------------------------- prompts and reward
def test_prompts_tokenize_identically_in_both_frameworks():
    from rlcore.dataset_rows import prompt_token_ids

    tokenizer = _tokenizer()
    prompts = setup.make_prompts(tokenizer, 6, 128)
    assert len(set(prompts)) == 6
    # TRL's own tokenization of plain-text prompts (GRPOTrainer._tokenize_prompts reads only processing_class)
    trl_ids, _, _ = trl.GRPOTrainer._tokenize_prompts(SimpleNamespace(processing_class=tokenizer), prompts)
    for prompt, theirs in zip(prompts, trl_ids, strict=True):
        ours, truncated = prompt_token_ids(tokenizer, prompt, 128)
        assert not truncated and len(ours) == 128
        assert list(theirs) == ours
        assert ours[0] == tokenizer.bos_token_id


def test_parity_reward_values_and_signatures():
    ids = [[2, 4, 5, 7], [1, 3], [0, 0, 0, 1]]
    assert setup.parity_reward(["p"] * 3, ["c"] * 3, completion_ids=ids) == [0.5, 0.0, 0.75]
    # TRL passes extra keyword arguments; rlcore wraps plain functions and passes completion_ids
    assert setup.parity_reward(["p"], ["c"], completion_ids=[[2]], trainer_state=None, log_extra=print) == [1.0]
    from rlcore.rewards import as_reward_function

    assert as_reward_function(setup.parity_reward)(["p"] * 3, ["c"] * 3, completion_ids=ids) == [0.5, 0.0, 0.75]
    with pytest.raises(ValueError, match="completion_ids"):
        setup.parity_reward(["p"], ["c"])


# ---------------------------------------------------------------------- model files
def test_tensor_shapes_are_those_of_transformers_llama3_8b():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(setup._rlcore_model_helpers().LLAMA3_8B_CONFIG)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items()
                                                if k not in ("architectures", "model_type")}))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shapes = setup.llama_tensor_shapes(config)
    assert shapes == expected
    assert sum(torch.Size(s).numel() for s in shapes.values()) * 2 == 16_060_522_496  # bf16 bytes of 8.03 B


def test_random_model_dir_loads_in_transformers_and_is_reused(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    helpers = setup._rlcore_model_helpers()
    small = dict(helpers.LLAMA3_8B_CONFIG, vocab_size=2048, hidden_size=64, intermediate_size=96,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    monkeypatch.setattr(helpers, "LLAMA3_8B_CONFIG", small)  # same writer, shapes small enough for a CPU test
    path = str(tmp_path / "model")
    made = setup.prepare_model_dir(path, layers=2, seed=3)
    assert not made.reused and made.bytes > 0 and not os.path.exists(path + ".partial")
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    name = "model.layers.1.mlp.down_proj.weight"
    expected = setup.random_tensor(name, (64, 96), seed=3)
    assert torch.equal(model.state_dict()[name].to(torch.bfloat16), expected)
    assert abs(float(expected.float().std()) - setup.WEIGHT_STD) < 0.004
    assert torch.equal(model.state_dict()["model.norm.weight"].float(), torch.ones(64))
    assert AutoTokenizer.from_pretrained(path)("a b")["input_ids"][0] == _tokenizer().bos_token_id

    def digest(directory):
        return {f: hashlib.sha256(open(os.path.join(directory, f), "rb").read()).hexdigest()
                for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")}

    first = digest(path)
    again = setup.prepare_model_dir(path, layers=2, seed=3)
    assert again.reused and digest(path) == first
    rewritten = setup.prepare_model_dir(path, layers=2, seed=4)
    assert not rewritten.reused and digest(path) != first and set(digest(path)) == set(first)


# ---------------------------------------------------------------------- instruments
class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_phase_clock_times_are_exclusive_of_nested_phases():
    now = FakeTime()
    clock = measure.PhaseClock(now=now)
    labels = []
    clock._on_change = labels.append

    class Engine:
        def wake_up(self, tags=None):
            now.t += 0.5

        def sync_weights(self):
            now.t += 1.0
            self.wake_up(tags=["weights"])  # as TRL's sync_weights does
            now.t += 2.0

        def generate(self, prompts, sampling_params=None, use_tqdm=False):
            now.t += 4.0
            return prompts

    engine = Engine()
    clock.wrap(engine, "wake_up", measure.wake_up_label)
    clock.wrap(engine, "sync_weights", "weight_sync")
    clock.wrap(engine, "generate", "generate")
    engine.sync_weights()
    engine.wake_up(tags=["kv_cache"])
    engine.generate([1, 2], sampling_params=None, use_tqdm=False)
    assert clock.totals == {"weight_sync": 3.5, "standby": 0.5, "generate": 4.0}
    assert clock.counts == {"weight_sync": 2, "standby": 1, "generate": 1}
    assert labels[:4] == ["weight_sync", "weight_sync", "weight_sync", "other"]
    assert measure.wake_up_label() == "standby" and measure.wake_up_label(["weights"]) == "weight_sync"


def test_step_recorder_splits_a_step_and_tracks_peaks():
    now = FakeTime()
    used = iter([1, 5, 9, 7, 3, 2, 2, 2])
    sampler = measure.DeviceMemorySampler(lambda: next(used) * 2**30)
    clock = measure.PhaseClock(now=now, on_change=lambda label: setattr(sampler, "label", label))
    recorder = measure.StepRecorder(clock, sampler, now=now)
    generate = measure.synthetic_generate([10, 11], logprob=-1.0)
    recorder.begin()                                    # samples 1 GiB (label "other")
    with clock.phase("generate"):
        now.t += 3.0
        sampler.sample()                                # 5
        clock.count_generated(generate([{"prompt_token_ids": [1]}] * 2, SimpleNamespace(max_tokens=4)))
    with clock.phase("weight_sync"):
        now.t += 0.25
        sampler.sample()                                # 9
    now.t += 6.0
    sampler.sample()                                    # 7, training
    record = recorder.end()                             # samples 3
    assert record["step_s"] == 9.25 and record["generate_s"] == 3.0 and record["weight_sync_s"] == 0.25
    assert record["standby_s"] == 0.0 and record["train_and_rest_s"] == 6.0
    assert record["generated_tokens"] == 8
    assert record["peak_device_gib"] == 9
    assert record["phase_peak_device_gib"] == {"other": 7, "generate": 5, "weight_sync": 9}
    recorder.begin()                                    # a new window: 2
    now.t += 1.0
    second = recorder.end()
    assert second["peak_device_gib"] == 2 and second["train_and_rest_s"] == 1.0 and sampler.peak == 9 * 2**30
    assert recorder.steps == [record, second]


def test_training_labels_split_train_and_rest_and_keep_their_own_memory_peak():
    """Training work labelled as phases (nested as in TRL: the log-probs with grad inside compute_loss, a
    standby call inside a training call) adds logprob_pass_s / forward_backward_s without shrinking
    train_and_rest_s, and the training-phase peak leaves out the KV cache mapped before and during generation."""
    now = FakeTime()
    device = {"used": 127.0}
    sampler = measure.DeviceMemorySampler(lambda: int(device["used"] * 2**30))
    clock = measure.PhaseClock(now=now, on_change=measure.label_follower(sampler))
    recorder = measure.StepRecorder(clock, sampler, now=now)
    recorder.begin()                                    # KV cache mapped: 127 GiB, label "other"
    with clock.phase("generate"):
        now.t += 3.0
    with clock.phase("standby"):
        now.t += 0.5
        device["used"] = 20.0                           # the engine sleeps: only read as the phase ends
    with clock.phase("logprob_pass"):
        now.t += 4.0
        device["used"] = 31.0
    now.t += 0.25                                       # rewards, bookkeeping: no label
    with clock.phase("forward_backward"):               # compute_loss
        now.t += 1.0
        with clock.phase("forward_backward"):           # the log-probs with grad, inside it
            now.t += 2.0
            device["used"] = 45.5
        with clock.phase("standby"):
            now.t += 0.5
    record = recorder.end()
    assert record["step_s"] == 11.25
    assert (record["generate_s"], record["standby_s"], record["weight_sync_s"]) == (3.0, 1.0, 0.0)
    assert record["logprob_pass_s"] == 4.0 and record["forward_backward_s"] == 3.0
    # the step minus generate, weight sync and standby: 4 + 0.25 + 3 (subtracting every label would leave 0.25)
    assert record["train_and_rest_s"] == 7.25
    peaks = record["phase_peak_device_gib"]
    assert peaks["generate"] == 127.0 and peaks["standby"] == 45.5 and record["peak_device_gib"] == 127.0
    assert peaks["logprob_pass"] == 31.0 and peaks["forward_backward"] == 45.5
    assert report.train_phase_peak(peaks) == 45.5
    assert report.train_phase_peak({"other": 127.0, "generate": 127.0}) is None
    assert sampler.phase_peaks_gib()["logprob_pass"] == 31.0
    assert report.TRAINING_PHASES == measure.TRAINING_PHASES  # the report's copy (it imports nothing)


def test_trl_log_prob_label_follows_grad_mode():
    assert measure.logprob_label("model", input_ids=None) == "forward_backward"
    with torch.no_grad():
        assert measure.logprob_label("model", input_ids=None) == "logprob_pass"


def test_unique_weight_bytes_counts_shared_storage_once():
    engine = torch.nn.Linear(16, 24, bias=False)
    shared, copied = torch.nn.Module(), torch.nn.Module()
    shared.q = torch.nn.Parameter(engine.weight.data[:8], requires_grad=False)  # a row view, like q of qkv
    shared.k = torch.nn.Parameter(engine.weight.data[8:], requires_grad=False)
    shared.lora = torch.nn.Parameter(torch.zeros(4, 16))
    copied.w = torch.nn.Parameter(engine.weight.data.clone())
    engine_bytes = 16 * 24 * 4
    one = measure.unique_weight_bytes(engine, shared)
    assert one["unique_bytes"] == engine_bytes + 4 * 16 * 4
    two = measure.unique_weight_bytes(engine, copied)
    assert two["unique_bytes"] == 2 * engine_bytes and two["per_module_bytes"] == [engine_bytes, engine_bytes]


def test_synthetic_rollouts_read_by_both_frameworks():
    from trl.generation.vllm_generation import extract_logprobs

    from rlcore.vllm_compat import sampled_logprobs

    allowed = list(range(100, 140))
    generate = measure.synthetic_generate(allowed, logprob=-11.76, seed=1)
    prompts = [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]
    # rlcore passes one SamplingParams per prompt, positionally; TRL one for all, by keyword
    ours = generate(prompts, [SimpleNamespace(max_tokens=5), SimpleNamespace(max_tokens=7)], use_tqdm=False)
    theirs = generate(prompts, sampling_params=SimpleNamespace(max_tokens=6), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in ours] == [5, 7]
    assert all(t in allowed for o in ours for t in o.outputs[0].token_ids)
    completion = ours[0].outputs[0]
    assert sampled_logprobs(completion.logprobs, completion.token_ids) == [-11.76] * 5
    assert completion.finish_reason == "length"
    logprobs, token_ids = extract_logprobs(theirs)
    assert logprobs == [[[-11.76]] * 6, [[-11.76]] * 6]
    assert [[ids[0] for ids in seq] for seq in token_ids] == [list(o.outputs[0].token_ids) for o in theirs]
    assert [o.prompt_token_ids for o in theirs] == [[1, 2, 3], [4]]
    again = measure.synthetic_generate(allowed, logprob=-11.76, seed=1)(prompts, sampling_params=SimpleNamespace(
        max_tokens=6))
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in theirs]


@pytest.mark.parametrize("error_type, message, expected", [
    ("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB", "oom"),
    ("ValueError", "Free memory on device cuda:0 (120.1/139.8 GiB) on startup is less than desired GPU memory "
                   "utilization (0.9, 125.8 GiB).", "oom"),
    ("ValueError", "To serve at least one request with the models's max seq len (262272), (32.0 GiB KV cache is "
                   "needed, which is larger than the available KV cache memory (20.1 GiB).", "oom"),
    ("RuntimeError", "CUDA error: an illegal memory access was encountered", "error"),
    ("ImportError", "No module named 'datasets'", "error"),
])
def test_failures_are_classified(error_type, message, expected):
    assert measure.classify_failure(error_type, message) == expected


# ---------------------------------------------------------------------- real training loops, tiny model
def test_trl_step_window_contains_generation_and_agrees_with_trl_step_time(tmp_path):
    import datasets
    from transformers import AutoTokenizer

    path = _tiny()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    # the probes' shape: one micro-batch per optimizer step, so the second step trains on the buffered generation
    # and the first runs TRL's no-grad old-log-prob pass (gradient_accumulation_steps 1 < steps_per_generation 2)
    setting = setup.Setting("tiny", num_prompts=1, num_generations=2, completion_length=8, prompt_length=16,
                            micro_batch=1, accumulate=False)
    config = setup.trl_config(setting, str(tmp_path), 2, use_cpu=True, use_vllm=False, bf16=False,
                              model_init_kwargs={"dtype": "float32"})
    clock = measure.PhaseClock()
    recorder = measure.StepRecorder(clock)
    rows = [{"prompt": p} for p in setup.make_prompts(tokenizer, 4, 16)]
    trainer = trl.GRPOTrainer(model=path, reward_funcs=[setup.parity_reward], args=config,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=setup.trl_lora_config(),
                              callbacks=[measure.trainer_step_callback(recorder)])
    clock.wrap(trainer, "_generate_single_turn", "generate")
    vs_trl.label_trl_training(clock, trainer)
    trainer.train()
    assert len(recorder.steps) == 2
    trl_step_times = [log["step_time"] for log in trainer.state.log_history if "step_time" in log]
    for record, theirs in zip(recorder.steps, trl_step_times, strict=True):
        # TRL's own step_time sums its training_step calls (generation included): inside our window
        assert theirs <= record["step_s"] + 1e-3 and record["step_s"] - theirs < 1.0
        assert record["forward_backward_s"] > 0
        # the training labels are parts of train + rest, not taken out of it
        assert record["train_and_rest_s"] >= record["logprob_pass_s"] + record["forward_backward_s"] - 1e-9
    first, second = recorder.steps
    assert first["generate_s"] > 0 and first["logprob_pass_s"] > 0
    assert second["generate_s"] == 0 and second["logprob_pass_s"] == 0
    # the wrapped methods are the ones TRL calls through the instance: once for the no-grad pass of the one
    # generation; per step compute_loss, the log-probs with grad inside it, and accelerator.backward
    assert clock.counts["logprob_pass"] == 1 and clock.counts["forward_backward"] == 2 * 3


def test_rlcore_training_steps_are_recorded(tmp_path):
    from rlcore import GRPOConfig, GRPOTrainer, ModelConfig

    clock = measure.PhaseClock()
    recorder = measure.StepRecorder(clock)
    # the probes' shape, as in the TRL test above: two optimizer steps read one generation
    trainer = GRPOTrainer(ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32"),
                          reward_funcs=[setup.parity_reward], train_dataset=[{"prompt": "What is 2 + 3?"}] * 4,
                          args=GRPOConfig(num_generations=2, per_device_train_batch_size=1, steps_per_generation=2,
                                          gradient_accumulation_steps=1, max_steps=2, max_completion_length=4,
                                          output_dir=str(tmp_path), report_to="none"),
                          show_progress=False)
    clock.wrap(trainer.engine, "generate", "generate")
    vs_trl.label_rlcore_training(clock, trainer)
    measure.record_each_call(trainer, "training_step", recorder)
    trainer.train()
    assert len(recorder.steps) == 2
    for record in recorder.steps:
        assert record["forward_backward_s"] > 0 and "loss" in record["framework_metrics"]
        assert record["train_and_rest_s"] >= record["logprob_pass_s"] + record["forward_backward_s"] - 1e-9
    first, second = recorder.steps
    assert first["generate_s"] > 0 and first["logprob_pass_s"] > 0
    assert second["generate_s"] == 0 and second["logprob_pass_s"] == 0
    # called through the instance: the old-policy pass once for the one generation, one micro-step per step
    assert clock.counts["logprob_pass"] == 1 and clock.counts["forward_backward"] == 2


# ---------------------------------------------------------------------- summaries and tables
def _run(framework, step_times, generate=1.0, peak=40.0, weights=15.0, status="ok", error=None):
    steps = [{"step_s": s, "generate_s": generate, "weight_sync_s": 0.01, "standby_s": 0.2,
              "train_and_rest_s": s - generate - 0.21, "generated_tokens": 1000, "peak_device_gib": peak + i}
             for i, s in enumerate(step_times)]
    return {"framework": framework, "setting": {"name": "16x8x512"}, "status": status, "error": error,
            "steps": steps, "warmup": 2, "weights": {"unique_gib": weights}, "kv_cache_tokens": 800000}


def test_summary_is_the_median_after_warmup_and_the_peak_over_measured_steps():
    summary = report.summarize_run(_run("rlcore", [50.0, 40.0, 10.0, 12.0, 11.0]), warmup=2)
    assert summary["step_s"] == 11.0 and summary["steps_measured"] == 3
    assert summary["generate_tok_s"] == 1000.0
    assert summary["peak_device_gib"] == 44.0  # the largest of the measured steps, not of the warm-up
    assert summary["train_and_rest_s"] == pytest.approx(11.0 - 1.21)
    short = report.summarize_run(_run("rlcore", [50.0, 40.0]), warmup=2)
    assert short["status"] == "too few steps" and short["step_s"] is None


def test_step_table_rows_and_ratios():
    ours = report.summarize_run(_run("rlcore", [9, 9, 10.0, 10.0, 10.0], peak=40.0, weights=15.0), 2)
    theirs = report.summarize_run(_run("trl", [9, 9, 25.0, 25.0, 25.0], peak=80.0, weights=30.0), 2)
    table = report.step_table([ours, theirs])
    assert "| 16x8x512 | rlcore | 10.00 |" in table and "| 16x8x512 | TRL 1.16 colocate | 25.00 |" in table
    # peaks are the largest measured step's: 40 + 4 and 80 + 4 GiB
    assert report.ratios([ours, theirs]) == {"16x8x512": {"step": 2.5, "peak": 84 / 44, "weights": 2.0}}
    assert "| 16x8x512 | 2.50× | 1.91× | 2.00× |" in table
    failed = report.summarize_run(_run("trl", [], status="oom", error="OutOfMemoryError: CUDA out of memory"), 2)
    table = report.step_table([ours, failed])
    assert "oom: OutOfMemoryError: CUDA out of memory" in table
    assert "| 16x8x512 | – | – | 1.00× |" in table  # no steps: only the weight bytes compare


# ---------------------------------------------------------------------- bounded longest-length search
def _threshold_probe(threshold, calls):
    def probe(length):
        calls.append(length)
        return {"outcome": "ok" if length <= threshold else "oom"}
    return probe


@pytest.mark.parametrize("threshold", [5000, 8192, 20000, 70000, 131072, 262144, 400000])
def test_search_finds_the_threshold_to_the_granularity(threshold):
    calls = []
    found = report.bounded_search(_threshold_probe(threshold, calls), start=8192, maximum=262144,
                                  granularity=8192, max_probes=20)
    expected = min(threshold, 262144) // 8192 * 8192 or None
    assert found.longest_ok == expected
    assert calls == [p["length"] for p in found.probes] and len(calls) == len(set(calls))
    if threshold < 262144:
        assert found.first_failure - (found.longest_ok or 0) <= 8192 and found.failure_outcome == "oom"
    else:
        assert found.first_failure is None and "maximum" in found.stopped
    assert all(length % 8192 == 0 for length in calls)


def test_search_stops_at_probe_limit_budget_and_errors():
    calls = []
    found = report.bounded_search(_threshold_probe(100000, calls), 8192, 262144, 8192, max_probes=3)
    assert calls == [8192, 16384, 32768] and found.longest_ok == 32768 and "limit" in found.stopped
    allowed = iter([True, True, False])
    found = report.bounded_search(_threshold_probe(100000, []), 8192, 262144, 8192, 10,
                                  can_probe=lambda length: next(allowed))
    assert found.longest_ok == 16384 and len(found.probes) == 2 and "budget" in found.stopped

    def broken(length):
        return {"outcome": "ok" if length < 16384 else "error", "error": "ImportError: trl"}
    found = report.bounded_search(broken, 8192, 262144, 8192, 10)
    assert found.longest_ok == 8192 and found.first_failure == 16384 and found.stopped == "error at 16384"
    assert len(found.probes) == 2  # no bisection after a failure that is not a memory limit

    def slow(length):
        return {"outcome": "ok" if length <= 40000 else "timeout"}
    found = report.bounded_search(slow, 8192, 262144, 8192, 10)
    assert found.longest_ok == 40960 - 8192 and found.failure_outcome == "timeout"
    with pytest.raises(ValueError, match="granularity"):
        report.bounded_search(slow, 8192, 4096, 8192, 10)


def test_probes_from_several_runs_combine():
    probes = [{"length": 16384, "outcome": "ok"}, {"length": 65536, "outcome": "oom", "error": "CUDA out of memory"},
              {"length": 32768, "outcome": "ok"}, {"length": 49152, "outcome": "timeout"}]
    found = report.longest_from_probes(probes)
    assert (found["longest_ok"], found["first_failure"], found["failure_outcome"]) == (32768, 49152, "timeout")
    table = report.longest_table({"trl": found, "rlcore": report.longest_from_probes([{"length": 131072,
                                                                                        "outcome": "ok"}])},
                                 {"trl": report.kv_bound(760000, 128), "rlcore": None})
    assert "| TRL 1.16 colocate | 32,768 | 49,152 (timeout) |" in table
    assert "| 94,872 |" in table  # 760,000 // 8 - 128
    assert "| rlcore | 131,072 | – |" in table


# ---------------------------------------------------------------------- estimate from the training-phase peak
def _probe(length, peak, outcome="ok", total=140.0, generations=2):
    return {"length": length, "outcome": outcome, "train_phase_peak_gib": peak, "device_total_gib": total,
            "num_generations": generations}


def test_memory_estimate_of_an_exact_line():
    # peak = 16 GiB + 1 GiB per 1,024 tokens; limit 140 - 2 GiB: (138 - 16) × 1024
    probes = [_probe(16384, 32.0), _probe(32768, 48.0), _probe(65536, 80.0),
              _probe(131072, None, "timeout"), _probe(8192, 999.0, "oom")]  # failures are not points
    found = report.memory_estimate(probes)
    assert found["length"] == 124928 and found["reason"] is None
    assert (found["intercept_gib"], found["slope_gib_per_token"]) == (16.0, 1 / 1024)
    assert found["limit_gib"] == 138.0 and found["lengths"] == [16384, 32768, 65536]
    assert found["max_residual_gib"] == 0.0
    assert report.memory_estimate(probes, device_total_gib=100.0, margin_gib=0.0)["length"] == 86016


def test_memory_estimate_is_least_squares():
    rng = np.random.default_rng(0)
    lengths = np.array([8192, 16384, 16384, 32768, 49152], dtype=float)
    peaks = 20.0 + 0.0007 * lengths + rng.normal(0.0, 0.4, lengths.size)
    found = report.memory_estimate([_probe(int(n), float(p)) for n, p in zip(lengths, peaks, strict=True)])
    slope, intercept = np.polyfit(lengths, peaks, 1)  # an independent least-squares fit
    assert found["slope_gib_per_token"] == pytest.approx(slope, rel=1e-9)
    assert found["intercept_gib"] == pytest.approx(intercept, rel=1e-9)
    assert found["length"] == int(np.floor((138.0 - intercept) / slope))
    assert found["max_residual_gib"] == pytest.approx(np.abs(peaks - intercept - slope * lengths).max())


@pytest.mark.parametrize("probes, reason", [
    ([], "no passing probe"),
    ([_probe(32768, 40.0), _probe(32768, 41.0), _probe(65536, 90.0, "timeout")], "one length only (32,768)"),
    ([_probe(16384, 50.0), _probe(32768, 45.0)], "does not grow"),
    ([_probe(16384, 40.0), _probe(32768, 40.0)], "does not grow"),
    ([_probe(16384, 150.0), _probe(32768, 160.0)], "above 138.0 GiB"),
    ([_probe(16384, 30.0, total=None), _probe(32768, 40.0, total=None)], "device total"),
])
def test_memory_estimate_says_why_it_has_none(probes, reason):
    found = report.memory_estimate(probes)
    assert found["length"] is None and reason in found["reason"]


def test_longest_table_shows_the_estimate_column():
    probes = {"rlcore": [_probe(16384, 32.0), _probe(32768, 48.0)],
              "trl": [_probe(32768, 60.0, generations=8), _probe(131072, None, "timeout", generations=8)]}
    longest = {framework: report.longest_from_probes(found) for framework, found in probes.items()}
    table = report.longest_table(longest, {"rlcore": 111000, "trl": None})
    head = table.splitlines()[0]
    assert "estimated from the training-phase peak" in head and "ESTIMATE" in head
    assert "completions per probe" in head
    assert ("| rlcore | 32,768 | – | 16,384: ok, 32,768: ok | 2 | 16,384: 32.0, 32,768: 48.0 | ≈ 124,928 "
            "(peak ≈ 16.0 GiB + 0.977 GiB per 1k tokens reaches 138.0 GiB; 2 lengths) | 111,000 |") in table
    assert "| TRL 1.16 colocate | 32,768 | 131,072 (timeout) |" in table
    assert "| 8 | 32,768: 60.0 | – (training-phase peaks at one length only (32,768): a line needs two) |" in table
    assert "device total minus 2 GiB" in table and "not a measured pass" in table


def test_probe_records_from_finished_failed_and_stopped_processes():
    setting = {"completion_length": 32768, "num_generations": 2}
    finished = vs_trl.probe_record({
        "status": "ok", "setting": setting, "device_total_gib": 139.8, "train_peak_device_gib": 127.0,
        "steps": [{"step_s": 12.0, "logprob_pass_s": 3.8, "forward_backward_s": 7.0, "phase_peak_device_gib": {
            "other": 127.0, "generate": 127.0, "standby": 82.5, "logprob_pass": 30.2, "forward_backward": 41.7}}]})
    assert finished["outcome"] == "ok" and finished["length"] == 32768 and finished["num_generations"] == 2
    assert finished["train_phase_peak_gib"] == 41.7 and finished["device_total_gib"] == 139.8
    assert finished["train_phase_peaks_gib"] == {"logprob_pass": 30.2, "forward_backward": 41.7}
    assert finished["peak_device_gib"] == 127.0 and finished["logprob_pass_s"] == 3.8
    # an OOM: no step finished, the run's own per-label peaks are kept
    failed = vs_trl.probe_record({"status": "oom", "setting": setting, "error": "OutOfMemoryError", "steps": [],
                                  "phase_peak_device_gib": {"other": 127.0, "forward_backward": 139.1}})
    assert failed["outcome"] == "oom" and failed["train_phase_peak_gib"] == 139.1
    stopped = vs_trl.probe_record({"status": "running", "setting": setting, "steps": []})
    assert stopped["outcome"] == "incomplete" and stopped["train_phase_peak_gib"] is None
    assert vs_trl.probe_record({"status": "ok", "setting": setting, "steps": []})["outcome"] == "error"


# ---------------------------------------------------------------------- command line
def test_quick_mode_and_overrides_parse(tmp_path):
    args = vs_trl.parse_args(["--quick", "--rlcore-set", "activation_memory_gib=30", "--json", str(tmp_path / "x")])
    assert [s.name for s in args.settings] == ["16x8x512"]
    assert (args.warmup, args.steps, args.skip_longest, args.budget_s) == (1, 2, True, vs_trl.QUICK_BUDGET_S)
    assert args.reserve_s > 0  # the second framework keeps time to run
    assert args.rlcore_overrides == {"activation_memory_gib": 30}
    full = vs_trl.parse_args(["--probe-lengths", "32768,65536"])
    assert [s.name for s in full.settings] == ["16x8x512", "1x8x4096"] and (full.warmup, full.steps) == (3, 3)
    assert full.probe_lengths == [32768, 65536]
    assert full.budget_s == vs_trl.DEFAULT_BUDGET_S < 600 and full.reserve_s == 0


def test_probe_generations_reach_the_probe_setting(monkeypatch, tmp_path):
    assert vs_trl.parse_args([]).probe_generations == 8
    args = vs_trl.parse_args(["--longest-only", "--probe-generations", "2", "--probe-lengths", "16384,32768",
                              "--model-dir", str(tmp_path)])
    assert args.probe_generations == 2 and args.probe_lengths == [16384, 32768]
    seen = []

    def fake_process(framework, setting, args, work, prompts, timeout, *, warmup, steps, probe):
        # a framework process's result (the GPU part), as run_framework returns it
        seen.append((framework, setting, probe, steps))
        peak = 10.0 + setting.completion_length / 1024
        return {"framework": framework, "setting": asdict(setting), "status": "ok", "device_total_gib": 140.0,
                "steps": [{"step_s": 1.0, "phase_peak_device_gib": {"generate": 127.0, "forward_backward": peak}}]}

    monkeypatch.setattr(vs_trl, "run_framework", fake_process)
    monkeypatch.setattr(vs_trl, "build_prompts", lambda model_dir, count, length: ["p"] * count)
    probes = vs_trl.run_longest(args, vs_trl.Budget(None), str(tmp_path), ["trl", "rlcore"])
    assert [(f, s.name, s.num_generations, s.completion_length, p, n) for f, s, p, n in seen] == [
        ("trl", "1x2x16384", 2, 16384, True, 1), ("trl", "1x2x32768", 2, 32768, True, 1),
        ("rlcore", "1x2x16384", 2, 16384, True, 1), ("rlcore", "1x2x32768", 2, 32768, True, 1)]
    for setting in {s for _, s, _, _ in seen}:  # the rest of the probe shape is probe_setting's
        reference = setup.probe_setting(setting.completion_length)
        assert (setting.micro_batch, setting.accumulate, setting.num_prompts, setting.prompt_length) == \
            (reference.micro_batch, reference.accumulate, reference.num_prompts, reference.prompt_length)
    assert [(p["length"], p["num_generations"], p["train_phase_peak_gib"]) for p in probes["rlcore"]] == [
        (16384, 2, 26.0), (32768, 2, 42.0)]
    assert report.longest_from_probes(probes["trl"])["memory_estimate"]["length"] == (138 - 10) * 1024


def test_two_completion_probes_get_identical_settings_in_both_frameworks():
    probe = setup.probe_setting(32768, 2)
    model_config, grpo_config, trl_config, lora = _both(probe)
    assert setup.setting_mismatches(model_config, grpo_config, trl_config, lora) == []
    for config in (grpo_config, trl_config):
        assert (config.num_generations, config.generation_batch_size, config.per_device_train_batch_size) == (2, 2, 1)
        assert (config.steps_per_generation, config.gradient_accumulation_steps) == (2, 1)
    default = setup.probe_setting(4096)  # the default is the benchmark's 8
    assert (default.name, default.num_generations) == ("1x8x4096", vs_trl.ISSUE_GENERATIONS)


@pytest.mark.parametrize("argv, message", [
    (["--probe-generations", "1"], "--probe-generations must be at least 2"),
    (["--probe-lengths", "16k"], "--probe-lengths expects comma-separated integers"),
    (["--probe-lengths", "0,8192"], "--probe-lengths must be positive"),
])
def test_bad_probe_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        vs_trl.parse_args(argv)
    assert message in capsys.readouterr().err


def test_merge_combines_runs_and_probes(tmp_path, capsys):
    first = {"runs": [_run("rlcore", [9, 9, 10.0, 10.0, 10.0])], "probes": {"trl": [{"length": 8192,
                                                                                        "outcome": "ok"}]}}
    second = {"runs": [_run("trl", [9, 9, 30.0, 30.0, 30.0])], "probes": {"trl": [{"length": 16384,
                                                                                     "outcome": "oom"}]}}
    single = _run("rlcore", [9, 9, 12.0, 12.0, 12.0])  # one framework process's own JSON
    single["setting"] = {"name": "1x8x4096"}
    paths = []
    for index, data in enumerate((first, second, single)):
        paths.append(str(tmp_path / f"{index}.json"))
        with open(paths[-1], "w") as handle:
            json.dump(data, handle)
    assert vs_trl.merge_main(paths, str(tmp_path / "merged.json")) == 0
    out = capsys.readouterr().out
    assert "| 16x8x512 | 3.00× |" in out and "| TRL 1.16 colocate | 8,192 | 16,384 (oom) |" in out
    merged = json.load(open(tmp_path / "merged.json"))
    assert len(merged["runs"]) == 3 and merged["longest"]["trl"]["longest_ok"] == 8192
    assert "| 1x8x4096 | rlcore | 12.00 |" in out


def test_merge_reads_probe_processes_of_a_stopped_invocation(capsys):
    """The H200 probes of 2026-12-02: each framework trained at 32,768; the longer probe was stopped from outside
    before its step ended (only its process's own JSON came back), and no training-phase peak was recorded."""
    directory = os.path.join(ROOT, "benchmarks", "runs", "2026-12-02-longest")
    paths = sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".json"))
    assert vs_trl.merge_main(paths, None) == 0
    out = capsys.readouterr().out
    assert "| rlcore | 32,768 | 262,144 (incomplete) | 32,768: ok, 262,144: incomplete | 8 | – |" in out
    assert "| TRL 1.16 colocate | 32,768 | 131,072 (incomplete) |" in out
    assert "– (no passing probe recorded a training-phase peak)" in out
