"""rlcore side by side with TRL 1.16's GRPOTrainer (vLLM colocate + sleep mode + PEFT LoRA) on the same GPU.

The same GRPO run through both frameworks, each in its own process, one after the other, in one invocation:
Llama-3-8B shapes with random bf16 weights written once as safetensors (both load the same files), the tiny
tokenizer, identical prompts (each exactly 128 tokens), reward (:func:`vs_trl_setup.parity_reward`),
num_generations, batch, max lengths, loss_type, importance-sampling correction, learning rate, LoRA (r 16,
alpha 32, all 7 projections), gradient checkpointing and bf16 (:mod:`vs_trl_setup`; ``tests/test_vs_trl.py``
checks both configs field by field). Completions ignore EOS on both sides, so every step does the same work.
Settings: 16 prompts × 8 × 512 tokens (micro-batch 8) and 1 prompt × 8 × 4,096 (micro-batch 1).

Out: one markdown table (median step after the warm-up steps; generate / weight sync / sleep+wake / train+rest;
generated tokens/s; peak GPU memory; GPU bytes of weights; KV-cache tokens; TRL/rlcore ratios), the longest
completion that trains (bounded search, and an estimate from the training-phase memory), and
``$OUT/vs_trl.json`` (plus one log per process) when OUT is set.

What TRL 1.16 does in this mode (read from trl/generation/vllm_generation.py and trl/trainer/grpo_trainer.py):

* ``vllm.LLM(model=<path>, distributed_executor_backend="external_launcher", enable_sleep_mode=True,
  gpu_memory_utilization=vllm_gpu_memory_utilization, max_model_len=vllm_max_model_length,
  max_num_seqs=per_device_train_batch_size × steps_per_generation, max_num_batched_tokens=4096,
  logprobs_mode="processed_logprobs")`` loads its own copy of the weights from disk next to the training model
  (bf16, on the GPU). It sets RANK / LOCAL_RANK / WORLD_SIZE and MASTER_ADDR / MASTER_PORT itself just before.
* Right after start-up and after every generation: ``llm.sleep(level=2)``, which discards vLLM's weights and
  KV cache. Before each generation (``_generate_single_turn``, once per optimizer step) ``sync_weights``:
  ``empty_cache()``, ``llm.wake_up(tags=["weights"])``, then with PEFT ``model.merge_adapter()``, every base
  weight (all 291 tensors, 15 GiB at 8B) pushed one by one through ``model.load_weights([(name, tensor)])``,
  ``model.unmerge_adapter()``, ``llm.reset_prefix_cache()``. Then ``llm.wake_up(tags=["kv_cache"])``,
  ``llm.generate`` (no LoRA in vLLM: it samples from the merged weights), ``llm.sleep(level=2)``.
* With ``vllm_importance_sampling_correction`` (default) it runs a no-grad log-prob pass over the whole
  generation batch, as rlcore does.

How the time is split (same instruments on both sides, :mod:`vs_trl_measure`): the step is the wall time of one
optimizer step (TRL: a ``TrainerCallback``'s ``on_step_begin`` → ``on_step_end``; rlcore: around
``GRPOTrainer.training_step``), with ``torch.cuda.synchronize()`` at both ends. Inside it, methods of the live
objects are wrapped as phases (exclusive wall time, synchronized at the end of each): ``vllm.LLM.generate`` →
generate; TRL's ``VLLMGeneration.sync_weights`` + ``LLM.wake_up(tags=["weights"])`` / rlcore's
``VLLMEngine.sync_weights`` → weight sync; ``LLM.sleep`` + other ``LLM.wake_up`` / rlcore's ``VLLMEngine.sleep`` /
``wake`` → sleep/wake; the rest of the step (rewards, the no-grad log-prob pass, forward+backward, optimizer,
bookkeeping) → train + rest, of which the log-prob pass and forward+backward are also recorded on their own (see
Longest completion; each of those calls ends with ``torch.cuda.synchronize()`` too). Peak GPU memory is device
memory in use (NVML) sampled every 50 ms, as each phase starts and ends, and at step ends. Weight bytes count
each parameter storage once across the training model and vLLM's model (rlcore's trainer layers are views of
vLLM's tensors; TRL holds two copies).

KV budgets: rlcore's vLLM gets ``--rlcore-gpu-memory-utilization`` (0.9) of the GPU including the one copy of
the weights; TRL's vLLM gets ``--trl-gpu-memory-utilization`` (0.8) *besides* the training model's copy (about
16 GiB with LoRA and CUDA context), so both reserve about 126-128 GiB of a 140 GiB H200 while generating. vLLM
refuses a TRL share above ~0.88 there (it must fit in the memory left free by the training model).

Longest completion: bounded search (double from ``--longest-start``, then bisect to ``--longest-granularity``;
at most ``--max-probes`` probes per framework), each probe a fresh process with ``--probe-timeout-s``;
``--probe-lengths`` probes given lengths instead. A probe is one optimizer step at 1 prompt ×
``--probe-generations`` N (default 8, the benchmark's setting; at least 2) × L with one sequence per micro-batch,
trained on one micro-batch (steps_per_generation N, gradient_accumulation_steps 1), vLLM in eager mode, and
synthetic completions in place of ``LLM.generate`` (random tokens, fixed log-probs; the real engine still starts,
syncs, sleeps and wakes). vLLM allocates its KV cache up front, so generation-phase memory does not depend on L;
what grows with L is training, which runs for real: the framework's no-grad log-prob pass over all N and
forward+backward of one sequence. Those are labelled phases too (rlcore: ``GRPOTrainer._logps_no_grad`` →
logprob_pass, ``GRPOTrainer.micro_step`` → forward_backward; TRL: ``_get_per_token_logps_and_entropies`` without
grad → logprob_pass, with grad, ``compute_loss`` and ``accelerator.backward`` → forward_backward), so each step
records their times and each probe its training-phase peak (``train_phase_peak_gib``: NVML device memory in use
while either runs, sampled every 50 ms and as each phase starts and ends) next to the device total. The whole
step's peak is no use here: it includes the moments before and during generation when vLLM's KV cache (~110 GiB)
is mapped. The training-phase peak hardly depends on N (one sequence per micro-batch); the log-prob pass time is
proportional to N, so N = 2 makes probes cheaper without changing what they measure. Besides the longest length
that trained, the table gives an estimate (:func:`vs_trl_report.memory_estimate`): a least-squares line through
the training-phase peaks of passing probes at two or more lengths, extended to the device total minus 2 GiB,
and the KV-cache bound (8 sequences of L resident at once). On the H200 at L = 32,768 (N = 8) rlcore's step took
23.5 s, 15.3 s of it the log-prob pass, TRL's 27.6 s; at 131,072 (TRL) and 262,144 (rlcore) one probe step did
not finish in the ~4 minutes a probe could get: time, not memory, stopped the search there, hence the estimate.

Running it on the lent H200 (vllm 0.26.0, torch 2.11, transformers 5.17, peft 0.21; no TRL there):

1. Here, from the project root: ``EXTRA="$(cat benchmarks/vs_trl_wheels.txt)" bash ../shared/device/prepare.sh``
   (adds trl 1.16.0, datasets and multiprocess, 1.7 MB, to ``.device/whl``).
2. Device calls back to back (the machine forgets /tmp after 30 s idle). Calls 1-6, carry
   ``[".device/vparts/vllm.partNN"]``: ``mkdir -p /tmp/vp && cp .device/vparts/vllm.partNN /tmp/vp/``.
   Call 7, carry ``[".device/whl", ".device/install.sh"]`` (37 MB; part05 + the wheels would pass 64 MiB):
   ``source .device/install.sh && python3 -c "import pyarrow, datasets, trl.trainer.grpo_trainer, trl;
   print(trl.__version__, datasets.__version__, pyarrow.__version__)"``. (datasets 5.2 declares pyarrow >= 24;
   should the image's be older and the import fail, add ``pyarrow==26.0.1`` to EXTRA and carry it alone.)
   On a machine that still has vLLM in /tmp/site, call 7 alone installs the three wheels:
   ``python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/{trl,datasets,multiprocess}-*``.
3. Call 8 (≤ 9 min): ``export PYTHONPATH=/tmp/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0
   VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1; python3 benchmarks/vs_trl.py --quick``.
   ``--quick``: 16×8×512 only, 1 warm-up + 2 measured steps each, no length search, TRL first, children
   bounded by a 525 s budget (190 s kept for rlcore). Estimate: 1 min writing 16 GB of weights, ~3.5 min TRL
   (HF load + vLLM start ~2.2 min, ~25 s a step), ~3.2 min rlcore (vLLM start ~2 min, ~17 s a step): ~7.7 min.
4. Full numbers, one call each while the machine stays warm (the weights are reused from /tmp; every
   invocation stops starting processes at its ``--budget-s``, 570 s by default, 0 for none):
   ``--only trl --setting 16x8x512`` (~5 min), ``--only rlcore --setting 16x8x512`` (~4 min),
   ``--only trl --setting 1x8x4096`` (~6 min), ``--only rlcore --setting 1x8x4096`` (~5.5 min); then here
   ``python benchmarks/vs_trl.py --merge run1/vs_trl.json run2/vs_trl.json ...`` prints the combined tables
   (a framework process's own ``vs_trl_<framework>_<setting>.json`` under $OUT merges too, probes included).
5. Longest completion, both frameworks in one call (≤ 10 min), same exports as call 8:
   ``python3 benchmarks/vs_trl.py --longest-only --probe-generations 2 --probe-lengths 16384,32768
   --probe-timeout-s 200 --reserve-s 200``: four probes, TRL's two first. Estimate (from the numbers above, not
   measured with N = 2): per probe ~20 s of process start and imports, then start-up (TRL ~20 s, rlcore 30-60 s)
   and the step (N = 2 takes 6 of the 8 sequences out of the log-prob pass: rlcore ~12 s at 32,768, TRL
   ~15 s if its pass is a similar share of its 27.6 s; about half that at 16,384), so ~45-55 s a TRL probe
   and ~55-90 s an rlcore probe: ~4 min, plus ~1 min writing the weights on a fresh machine, ~5 min in all.
   Prints the longest-completion table with each framework's training-phase peaks at both lengths and the
   estimated length at which they reach the device. More lengths (another call, then ``--merge``) check the
   line: ``--probe-lengths 65536`` adds a third point.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from vs_trl_report import (FRAMEWORKS, TRAINING_PHASES, bounded_search, kv_bound, longest_from_probes,  # noqa: E402
                           longest_table, step_table, summarize_run, train_phase_peak)
from vs_trl_setup import SETTINGS, Setting, probe_setting  # noqa: E402

DEFAULT_MODEL_DIR = "/tmp/vs_trl_llama3_8b"
QUICK_BUDGET_S = 525
DEFAULT_BUDGET_S = 570  # a device call may run 600 s
MIN_CHILD_S = 120  # a framework process that can not get this long is not started
ISSUE_GENERATIONS = 8  # completions per prompt of the benchmark's settings, and of the probes by default


# ====================================================================== framework processes
def _write_json(path: str, data: Any) -> None:
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=str)
    os.replace(partial, path)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("torch", "vllm", "transformers", "peft", "trl", "datasets", "accelerate", "rlcore"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _nvml_index() -> int:
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def _regular_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's ordinary tokens (no special or added ones): what synthetic completions draw."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [i for i in range(len(tokenizer)) if i not in special]


def _instruments(result: dict[str, Any], save) -> tuple[Any, Any, Any]:
    import torch

    from vs_trl_measure import DeviceMemorySampler, PhaseClock, StepRecorder, device_used_reader, label_follower

    read, source = device_used_reader(_nvml_index())
    sampler = DeviceMemorySampler(read).start()
    result["memory_source"] = source
    result["device_used_at_start_gib"] = sampler.sample() / 2**30
    clock = PhaseClock(synchronize=torch.cuda.synchronize, on_change=label_follower(sampler))
    recorder = StepRecorder(clock, sampler, synchronize=torch.cuda.synchronize, on_record=lambda record: save())
    result["steps"] = recorder.steps  # the same list: every save() writes the steps so far
    return sampler, clock, recorder


def _after_init(result: dict[str, Any], sampler, started: float) -> None:
    import torch

    torch.cuda.synchronize()
    result["init_s"] = time.perf_counter() - started
    result["init_peak_device_gib"] = sampler.peak / 2**30
    result["device"] = torch.cuda.get_device_name()
    result["device_total_gib"] = torch.cuda.mem_get_info()[1] / 2**30


def _weights(result: dict[str, Any], training_model, llm, model_dir: str, separate_copy: bool) -> None:
    """GPU bytes of weights: the training model's and vLLM's parameters, each storage once. If vLLM's model is
    not reachable, its copy is taken as the checkpoint's size when it is a separate copy (TRL), and as already
    counted when the training model's weights are views of it (rlcore)."""
    from vs_trl_measure import unique_weight_bytes

    try:
        from rlcore.vllm_compat import live_model

        result["weights"] = unique_weight_bytes(training_model, live_model(llm))
        result["weights"]["engine_copy"] = "measured"
    except Exception as error:  # noqa: BLE001 - a measurement must not stop the run
        trainer_only = unique_weight_bytes(training_model)
        extra = 0
        if separate_copy:
            with open(os.path.join(model_dir, "model.safetensors.index.json"), encoding="utf-8") as handle:
                extra = json.load(handle)["metadata"]["total_size"]
        total = trainer_only["unique_bytes"] + extra
        result["weights"] = {**trainer_only, "unique_bytes": total, "unique_gib": total / 2**30,
                             "engine_copy": f"not measured ({error!r}); "
                                            + ("checkpoint size added" if separate_copy else "shared views")}


def label_rlcore_training(clock, trainer) -> None:
    """rlcore's training work as phases: ``GRPOTrainer._logps_no_grad`` (the old-policy pass over the whole
    generation) → logprob_pass, ``GRPOTrainer.micro_step`` (forward, loss and backward of one micro-batch) →
    forward_backward. Both are called through the instance (``self.…``), so instance attributes take effect."""
    clock.wrap(trainer, "_logps_no_grad", "logprob_pass")
    clock.wrap(trainer, "micro_step", "forward_backward")


def label_trl_training(clock, trainer) -> None:
    """TRL 1.16's training work as phases (read from trl/trainer/grpo_trainer.py and transformers' Trainer,
    all called as ``self.…``): ``_get_per_token_logps_and_entropies`` under ``torch.no_grad()`` (the old-policy
    pass of ``_generate_and_score_completions``) → logprob_pass, with gradients (inside ``_compute_loss``) →
    forward_backward; ``compute_loss`` and ``accelerator.backward`` → forward_backward."""
    from vs_trl_measure import logprob_label

    clock.wrap(trainer, "_get_per_token_logps_and_entropies", logprob_label)
    clock.wrap(trainer, "compute_loss", "forward_backward")
    clock.wrap(trainer.accelerator, "backward", "forward_backward")


def _train(trainer, result: dict[str, Any], sampler) -> None:
    """``trainer.train()``; the per-label peaks are kept with the result even when training fails (an OOM)."""
    try:
        trainer.train()
    finally:
        result["phase_peak_device_gib"] = sampler.phase_peaks_gib()
    result["train_peak_device_gib"] = sampler.peak / 2**30


def _synthetic(llm, tokenizer, vocab_size: int, seed: int) -> None:
    from vs_trl_measure import synthetic_generate

    llm.generate = synthetic_generate(_regular_token_ids(tokenizer), -math.log(vocab_size), seed)


def run_rlcore(spec: dict[str, Any], result: dict[str, Any], save) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    sampler, clock, recorder = _instruments(result, save)
    from rlcore.trainer import GRPOTrainer
    from vs_trl_measure import record_each_call
    from vs_trl_setup import parity_reward, rlcore_configs, settings_view

    setting = Setting(**spec["setting"])
    model_config, grpo_config = rlcore_configs(
        setting, spec["model_dir"], spec["output_dir"], spec["max_steps"],
        gpu_memory_utilization=spec["rlcore_gpu_memory_utilization"], enforce_eager=spec["eager"],
        overrides=spec["rlcore_overrides"])
    result["settings"] = settings_view("rlcore", model_config, grpo_config)
    result["config"] = {"model": model_config.to_dict(), "grpo": grpo_config.to_dict()}
    save()
    started = time.perf_counter()
    trainer = GRPOTrainer(model_config, reward_funcs=[parity_reward], args=grpo_config,
                          train_dataset=[{"prompt": p} for p in spec["prompts"]], show_progress=False)
    engine = trainer.engine
    # fixed-length completions, as TRL's generation_kwargs={"ignore_eos": True}: vLLM keeps generating past
    # EOS, and no stop tokens are passed (rlcore passes EOS / <|eot_id|> as stop_token_ids otherwise)
    engine.ignore_eos = True
    trainer.stop_tokens = ()
    _after_init(result, sampler, started)
    result["kv_cache_tokens"] = engine.kv_cache_tokens
    _weights(result, trainer.model, engine.llm, spec["model_dir"], separate_copy=False)
    if spec["synthetic"]:
        _synthetic(engine.llm, trainer.tokenizer, engine.hf_config().vocab_size, grpo_config.seed)
    clock.wrap(engine.llm, "generate", "generate", after=clock.count_generated)
    clock.wrap(engine, "sync_weights", "weight_sync")
    clock.wrap(engine, "wake", "standby")
    clock.wrap(engine, "sleep", "standby")
    label_rlcore_training(clock, trainer)
    record_each_call(trainer, "training_step", recorder)
    save()
    _train(trainer, result, sampler)


def run_trl(spec: dict[str, Any], result: dict[str, Any], save) -> None:
    # vLLM's external_launcher reads these; TRL sets RANK / LOCAL_RANK / WORLD_SIZE itself right before starting
    # vLLM. LOCAL_RANK must NOT be set earlier: accelerate would take the run for distributed (MULTI_GPU) and
    # wrap the model in DistributedDataParallel.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.pop("LOCAL_RANK", None)
    sampler, clock, recorder = _instruments(result, save)
    import datasets
    from transformers import AutoConfig, AutoTokenizer
    from trl import GRPOTrainer

    from vs_trl_measure import trainer_step_callback, wake_up_label
    from vs_trl_setup import parity_reward, settings_view, trl_config, trl_lora_config

    if spec["eager"]:
        import functools

        from trl.generation import vllm_generation

        # TRL exposes no enforce_eager; the length probes start vLLM without CUDA graphs to save start-up time
        if not hasattr(vllm_generation, "LLM"):
            raise RuntimeError("trl.generation.vllm_generation has no LLM: vLLM is not importable here")
        vllm_generation.LLM = functools.partial(vllm_generation.LLM, enforce_eager=True)

    setting = Setting(**spec["setting"])
    config = trl_config(setting, spec["output_dir"], spec["max_steps"],
                        gpu_memory_utilization=spec["trl_gpu_memory_utilization"])
    lora = trl_lora_config()
    result["settings"] = settings_view("trl", config, lora)
    result["config"] = {"grpo": {k: str(v) for k, v in config.to_dict().items()}, "lora": str(lora)}
    save()

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left", truncation_side="left")
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in spec["prompts"]])
    started = time.perf_counter()
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=[parity_reward], args=config,
                          train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                          callbacks=[trainer_step_callback(recorder)])
    generation = trainer.vllm_generation
    llm = generation.llm
    _after_init(result, sampler, started)
    from rlcore.vllm_compat import kv_cache_tokens

    try:
        result["kv_cache_tokens"] = kv_cache_tokens(llm, None)
    except Exception as error:  # noqa: BLE001
        result["kv_cache_tokens_error"] = repr(error)
    _weights(result, trainer.model, llm, spec["model_dir"], separate_copy=True)
    if spec["synthetic"]:
        _synthetic(llm, tokenizer, AutoConfig.from_pretrained(spec["model_dir"]).vocab_size, config.seed)
    clock.wrap(llm, "generate", "generate", after=clock.count_generated)
    clock.wrap(generation, "sync_weights", "weight_sync")
    clock.wrap(llm, "wake_up", wake_up_label)
    clock.wrap(llm, "sleep", "standby")
    label_trl_training(clock, trainer)
    save()
    _train(trainer, result, sampler)
    result["framework_metrics"] = trainer.state.log_history


def child_main(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    result: dict[str, Any] = {"framework": spec["framework"], "setting": spec["setting"], "warmup": spec["warmup"],
                              "probe": spec["synthetic"], "status": "running", "error": None, "steps": [],
                              "versions": _versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "gpu_memory_utilization": spec[f"{spec['framework']}_gpu_memory_utilization"],
                              "eager": spec["eager"], "rlcore_overrides": spec["rlcore_overrides"]}

    def save() -> None:
        _write_json(spec["result"], result)

    save()
    try:
        (run_rlcore if spec["framework"] == "rlcore" else run_trl)(spec, result, save)
        result["status"] = "ok"
        code = 0
    except BaseException as error:  # noqa: BLE001 - an OOM (or any failure) is a result: record it
        from vs_trl_measure import classify_failure

        result["status"] = classify_failure(type(error).__name__, str(error))
        result["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
        result["traceback"] = traceback.format_exc()[-6000:]
        traceback.print_exc()
        code = 1
    save()
    sys.stdout.flush()
    sys.stderr.flush()
    # vLLM's engine and its threads can hang interpreter shutdown; the results are written
    os._exit(code)


def write_model_main(path: str, layers: int | None, seed: int) -> int:
    import torch

    from vs_trl_setup import prepare_model_dir

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    made = prepare_model_dir(path, layers=layers, seed=seed, device=device)
    print(json.dumps({"path": made.path, "gib": made.bytes / 2**30, "reused": made.reused,
                      "seconds": time.perf_counter() - started, "device": device}))
    return 0


# ====================================================================== orchestration
class Budget:
    """Wall-clock budget of one invocation (None: unlimited)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def remaining(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.monotonic() - self.start)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(framework: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), ROOT) if p)
    # VLLM_ALLOW_LONG_MAX_MODEL_LEN: length probes may pass config.json's max_position_embeddings (131072);
    # RoPE has no trained range to leave with random weights
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               VLLM_ALLOW_LONG_MAX_MODEL_LEN="1")
    env.pop("LOCAL_RANK", None)
    if framework == "trl":
        env.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return env


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def run_process(command: list[str], log_path: str, timeout: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Runs ``command`` in its own session, output to ``log_path``; on timeout stops its process group.
    Returns (exit code or None on timeout, seconds)."""
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            code = None
            for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    return code, time.monotonic() - started


def run_framework(framework: str, setting: Setting, args, work: str, prompts: list[str], timeout: float, *,
                  warmup: int, steps: int, probe: bool) -> dict[str, Any]:
    tag = f"{framework}_{setting.name}" + ("_probe" if probe else "")
    spec = {"framework": framework, "setting": asdict(setting), "model_dir": args.model_dir,
            "output_dir": os.path.join(work, f"out_{tag}"), "max_steps": warmup + steps, "warmup": warmup,
            "prompts": prompts, "synthetic": probe, "eager": args.eager or (probe and not args.probe_graphs),
            "trl_gpu_memory_utilization": args.trl_gpu_memory_utilization,
            "rlcore_gpu_memory_utilization": args.rlcore_gpu_memory_utilization,
            "rlcore_overrides": args.rlcore_overrides,
            # next to the logs: if the whole call is stopped, the steps done so far still come back with $OUT
            "result": os.path.join(args.log_dir, f"vs_trl_{tag}.json")}
    spec_path = os.path.join(work, f"{tag}.spec.json")
    _write_json(spec_path, spec)
    log_path = os.path.join(args.log_dir, f"vs_trl_{tag}.log")
    print(f"[vs_trl] {framework} {setting.name}{' (probe)' if probe else ''}: starting, timeout {timeout:.0f} s, "
          f"log {log_path}", flush=True)
    code, seconds = run_process([sys.executable, os.path.abspath(__file__), "_child", spec_path], log_path,
                                timeout, _child_env(framework))
    try:
        with open(spec["result"], encoding="utf-8") as handle:
            result = json.load(handle)
    except (OSError, ValueError):
        result = {"framework": framework, "setting": asdict(setting), "warmup": warmup, "steps": [],
                  "status": "running", "error": None}
    if code is None:
        result["status"] = "timeout"
        result["error"] = f"stopped after {seconds:.0f} s (timeout {timeout:.0f} s)"
    elif result.get("status") == "running":
        result["status"] = "crashed"
        result["error"] = f"exit code {code}; log tail:\n{_tail(log_path)}"
    result["wall_s"] = seconds
    result["log"] = log_path
    steps_done = len(result.get("steps") or [])
    print(f"[vs_trl] {framework} {setting.name}: {result['status']} after {seconds:.0f} s, {steps_done} steps",
          flush=True)
    if result["status"] != "ok":
        print((result.get("error") or "")[-1500:] + "\n" + _tail(log_path, 15), flush=True)
    return result


def ensure_model(args, budget: Budget) -> None:
    log_path = os.path.join(args.log_dir, "vs_trl_write_model.log")
    command = [sys.executable, os.path.abspath(__file__), "_write-model", args.model_dir, str(args.layers or 0),
               str(args.seed)]
    print(f"[vs_trl] model files: {args.model_dir}", flush=True)
    code, seconds = run_process(command, log_path, min(900.0, budget.remaining()), _child_env("rlcore"))
    if code != 0:
        raise SystemExit(f"writing the model failed (exit {code}):\n{_tail(log_path)}")
    print(f"[vs_trl] model ready in {seconds:.0f} s: {_tail(log_path, 1).strip()}", flush=True)


def build_prompts(model_dir: str, count: int, length: int) -> list[str]:
    from transformers import AutoTokenizer

    from vs_trl_setup import make_prompts

    return make_prompts(AutoTokenizer.from_pretrained(model_dir), count, length)


def _child_timeout(args, budget: Budget, later: int, probe: bool = False) -> float:
    limit = args.probe_timeout_s if probe else args.child_timeout_s
    return min(limit, budget.remaining() - later * args.reserve_s - 5)


def probe_record(result: dict[str, Any]) -> dict[str, Any]:
    """One probe's entry for the search and the tables, from a framework process's result.

    ``train_phase_peak_gib`` is the largest device memory in use while the framework ran its no-grad log-prob
    pass or forward + backward (the step's per-label peaks; the whole run's when no step finished, e.g. an OOM);
    ``peak_device_gib`` includes the moments vLLM's KV cache is mapped. A process that never recorded its end
    (stopped from outside) is ``incomplete``.
    """
    status = result.get("status")
    outcome = status if status in ("ok", "oom", "timeout") else "incomplete" if status == "running" else "error"
    steps = result.get("steps") or []
    if outcome == "ok" and not steps:
        outcome = "error"
    step = steps[-1] if steps else {}
    peaks = step.get("phase_peak_device_gib") or result.get("phase_peak_device_gib") or {}
    setting = result.get("setting") or {}
    return {"length": setting.get("completion_length"), "num_generations": setting.get("num_generations"),
            "outcome": outcome, "error": result.get("error"), "seconds": result.get("wall_s"),
            "step_s": step.get("step_s"), "logprob_pass_s": step.get("logprob_pass_s"),
            "forward_backward_s": step.get("forward_backward_s"), "kv_cache_tokens": result.get("kv_cache_tokens"),
            "peak_device_gib": result.get("train_peak_device_gib"),
            "train_phase_peaks_gib": {label: peaks[label] for label in TRAINING_PHASES if label in peaks},
            "train_phase_peak_gib": train_phase_peak(peaks), "device_total_gib": result.get("device_total_gib"),
            "log": result.get("log")}


def run_longest(args, budget: Budget, work: str, frameworks: list[str]) -> dict[str, list[dict[str, Any]]]:
    probes: dict[str, list[dict[str, Any]]] = {}
    prompts = build_prompts(args.model_dir, 1, 128)
    for index, framework in enumerate(frameworks):
        later = len(frameworks) - index - 1

        def probe(length: int, framework=framework, later=later) -> dict[str, Any]:
            result = run_framework(framework, probe_setting(length, args.probe_generations), args, work,
                                   prompts, _child_timeout(args, budget, later, probe=True), warmup=0, steps=1,
                                   probe=True)
            return {**probe_record(result), "length": length}

        def can_probe(length: int, later=later) -> bool:
            return _child_timeout(args, budget, later, probe=True) >= MIN_CHILD_S

        if args.probe_lengths:
            probes[framework] = [probe(length) for length in args.probe_lengths if can_probe(length)]
        else:
            found = bounded_search(probe, args.longest_start, args.longest_max, args.longest_granularity,
                                   args.max_probes, can_probe)
            probes[framework] = found.probes
            print(f"[vs_trl] {framework} longest: {found.longest_ok} (stopped: {found.stopped})", flush=True)
    return probes


def report(runs: list[dict[str, Any]], probes: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Prints the tables; returns the summaries (and settings check) for the JSON."""
    from vs_trl_setup import view_mismatches

    summaries = [summarize_run(run, run.get("warmup", 0)) for run in runs if not run.get("probe")]
    out: dict[str, Any] = {"summaries": summaries, "settings_check": {}}
    if summaries:
        print("\n" + step_table(summaries))
    for name in dict.fromkeys(s["setting"] for s in summaries):
        views = {run["framework"]: run.get("settings") for run in runs
                 if run.get("setting", {}).get("name") == name and run.get("settings")}
        if {"rlcore", "trl"} <= set(views):
            mismatches = view_mismatches(views["rlcore"], views["trl"])
            out["settings_check"][name] = mismatches
            print(f"\nsettings {name}: " + ("identical on both sides" if not mismatches else
                                              "DIFFERENT: " + "; ".join(f"{n}: rlcore {a!r} vs TRL {b!r}"
                                                                        for n, a, b in mismatches)))
    if probes:
        longest = {framework: longest_from_probes(found) for framework, found in probes.items()}
        bounds = {}
        for framework in probes:
            kv = [p.get("kv_cache_tokens") for p in probes[framework] if p.get("kv_cache_tokens")]
            kv += [run.get("kv_cache_tokens") for run in runs if run["framework"] == framework
                   and run.get("kv_cache_tokens")]
            # the benchmark's group of 8, whatever the probes' count: what a real rollout would need resident
            bounds[framework] = (kv_bound(max(kv), probe_setting(1).prompt_length, ISSUE_GENERATIONS)
                                 if kv else None)
        print("\n" + longest_table(longest, bounds))
        out["longest"] = longest
        out["kv_bounds"] = bounds
    for run in runs:
        if run.get("status") not in ("ok", None):
            print(f"\n{run['framework']} {run.get('setting', {}).get('name')}: {run['status']}: "
                  f"{(run.get('error') or '')[:600]}")
    return out


def merge_main(paths: list[str], json_path: str | None) -> int:
    runs: dict[tuple[str, str, bool], dict[str, Any]] = {}
    probes: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        for run in data.get("runs", [data] if "framework" in data else []):
            runs[(run["framework"], run.get("setting", {}).get("name"), bool(run.get("probe")))] = run
        for framework, found in (data.get("probes") or {}).items():
            probes.setdefault(framework, []).extend(found)
    # a probe process's own JSON (left under $OUT when the invocation was stopped before recording it)
    for (framework, _, probe), run in runs.items():
        if not probe:
            continue
        record = probe_record(run)
        if record["length"] is not None and all(p.get("length") != record["length"]
                                                for p in probes.get(framework, [])):
            probes.setdefault(framework, []).append(record)
    ordered = sorted(runs.values(), key=lambda r: (r.get("setting", {}).get("name", ""), r["framework"]))
    summary = report(ordered, probes)
    if json_path:
        _write_json(json_path, {"merged_from": paths, "runs": ordered, "probes": probes, **summary})
    return 0


def dry_run(args, settings: list[Setting], frameworks: list[str]) -> int:
    """Builds both frameworks' configs for the chosen settings (no GPU needed) and prints what would run."""
    import torch

    from vs_trl_setup import rlcore_configs, setting_mismatches, trl_config, trl_lora_config

    extra = {} if torch.cuda.is_available() else {"use_cpu": True}
    probes = [] if args.skip_longest else [probe_setting(length, args.probe_generations)
                                           for length in args.probe_lengths or [args.longest_start]]
    for setting in ([] if args.longest_only else settings) + probes:
        model_config, grpo_config = rlcore_configs(setting, args.model_dir, "/tmp/vs_trl_dry", 1,
                                                   overrides=args.rlcore_overrides)
        mismatches = setting_mismatches(model_config, grpo_config,
                                        trl_config(setting, "/tmp/vs_trl_dry", 1, **extra), trl_lora_config())
        print(f"{setting.name}: generation batch {setting.generation_batch}, micro-batch {setting.micro_batch}, "
              f"gradient accumulation {setting.gradient_accumulation_steps}, max_model_len {setting.max_model_len}; "
              f"settings {'identical' if not mismatches else 'DIFFERENT: ' + repr(mismatches)}")
    measured = "none" if args.longest_only else ", ".join(s.name for s in settings)
    longest = "off" if args.skip_longest else (
        f"probes at {', '.join(f'{n:,}' for n in args.probe_lengths)}" if args.probe_lengths else "search")
    print(f"would run: {', '.join(frameworks)} × {measured}; warm-up {args.warmup}, measured {args.steps}; "
          f"longest completion: {longest}, {args.probe_generations} completions per probe; "
          f"budget {args.budget_s or 'none'} s")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=FRAMEWORKS, help="run one framework (default: both, TRL first)")
    parser.add_argument("--setting", action="append", choices=sorted(SETTINGS),
                        help="repeatable (default: both settings)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the measured ones")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (median)")
    parser.add_argument("--quick", action="store_true",
                        help="16x8x512 only, 1 warm-up + 2 measured steps, no length search, 525 s budget")
    parser.add_argument("--skip-longest", action="store_true")
    parser.add_argument("--longest-only", action="store_true", help="only the longest-completion search")
    parser.add_argument("--probe-lengths", default="",
                        help="probe exactly these lengths (comma list), no search; two or more passing lengths "
                             "give the estimate from the training-phase peak")
    parser.add_argument("--probe-generations", type=int, default=ISSUE_GENERATIONS,
                        help="completions per probe (>= 2; default 8, the benchmark's setting): the training-phase "
                             "peak does not depend on it, the log-prob pass time is proportional to it")
    parser.add_argument("--longest-start", type=int, default=8192)
    parser.add_argument("--longest-max", type=int, default=262144)
    parser.add_argument("--longest-granularity", type=int, default=8192)
    parser.add_argument("--max-probes", type=int, default=6, help="per framework")
    parser.add_argument("--probe-timeout-s", type=float, default=420)
    parser.add_argument("--probe-graphs", action="store_true", help="probes with CUDA graphs (default: eager)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall-clock budget of this invocation in seconds (0: none)")
    parser.add_argument("--child-timeout-s", type=float, default=590)
    parser.add_argument("--reserve-s", type=float, default=0,
                        help="time kept free for each framework process still to run (--quick: 190)")
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (smoke runs)")
    parser.add_argument("--seed", type=int, default=0, help="of the random weights")
    parser.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs in both frameworks")
    parser.add_argument("--trl-gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--rlcore-gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--rlcore-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra rlcore GRPOConfig/ModelConfig field (recorded; e.g. activation_memory_gib=30)")
    parser.add_argument("--json", default=None, help="default: $OUT/vs_trl.json when OUT is set")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier outputs into one table")
    parser.add_argument("--dry-run", action="store_true", help="build both configs and print the plan (CPU)")
    args = parser.parse_args(argv)
    if args.quick:
        args.setting = args.setting or ["16x8x512"]
        args.warmup, args.steps, args.skip_longest = 1, 2, True
        args.reserve_s = args.reserve_s or 190
        args.budget_s = min(args.budget_s, QUICK_BUDGET_S) if args.budget_s else QUICK_BUDGET_S
    args.settings = [SETTINGS[name] for name in dict.fromkeys(args.setting or list(SETTINGS))]
    try:
        args.probe_lengths = [int(x) for x in args.probe_lengths.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--probe-lengths expects comma-separated integers, got {args.probe_lengths!r}")
    if any(length < 1 for length in args.probe_lengths):
        parser.error(f"--probe-lengths must be positive, got {args.probe_lengths}")
    if args.probe_generations < 2:
        parser.error(f"--probe-generations must be at least 2 (GRPO's advantages compare completions of one "
                     f"prompt), got {args.probe_generations}")
    overrides = {}
    for item in args.rlcore_set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--rlcore-set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value
    args.rlcore_overrides = overrides
    if args.json is None and os.environ.get("OUT"):
        args.json = os.path.join(os.environ["OUT"], "vs_trl.json")
    if args.warmup < 0 or args.steps < 1:
        parser.error("--warmup must be >= 0 and --steps >= 1")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_child"]:
        return child_main(argv[1])
    if argv[:1] == ["_write-model"]:
        return write_model_main(argv[1], int(argv[2]) or None, int(argv[3]))
    args = parse_args(argv)
    if args.merge:
        return merge_main(args.merge, args.json)
    frameworks = [args.only] if args.only else ["trl", "rlcore"]
    if args.dry_run:
        return dry_run(args, args.settings, frameworks)
    budget = Budget(args.budget_s or None)
    work = tempfile.mkdtemp(prefix="vs_trl_")
    args.log_dir = os.environ.get("OUT") or work
    os.makedirs(args.log_dir, exist_ok=True)
    output: dict[str, Any] = {"argv": argv, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "probe_generations": args.probe_generations, "runs": [], "probes": {}}

    def save() -> None:
        if args.json:
            _write_json(args.json, output)

    ensure_model(args, budget)
    if not args.longest_only:
        plan = [(setting, framework) for setting in args.settings for framework in frameworks]
        for index, (setting, framework) in enumerate(plan):
            timeout = _child_timeout(args, budget, len(plan) - index - 1)
            if timeout < MIN_CHILD_S:
                output["runs"].append({"framework": framework, "setting": asdict(setting), "warmup": args.warmup,
                                       "steps": [], "status": "skipped", "error": "time budget spent"})
                continue
            rows = (args.warmup + args.steps) * setting.num_prompts
            prompts = build_prompts(args.model_dir, rows, setting.prompt_length)
            output["runs"].append(run_framework(framework, setting, args, work, prompts, timeout,
                                                warmup=args.warmup, steps=args.steps, probe=False))
            save()
    if not args.skip_longest:
        output["probes"] = run_longest(args, budget, work, frameworks)
        save()
    output.update(report(output["runs"], output["probes"]))
    output["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    save()
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
