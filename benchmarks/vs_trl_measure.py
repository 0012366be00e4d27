"""Framework-neutral measurement for ``benchmarks/vs_trl.py``: phase clock, device-memory sampler, step records,
weight bytes, synthetic rollouts and failure classes.

Both frameworks are measured with the same instruments, attached to the same kind of object: the phase clock
wraps methods of the live objects (``vllm.LLM.generate`` / ``sleep`` / ``wake_up``, each framework's weight
sync) and each framework's training work (its no-grad log-prob pass, its forward + loss + backward), and the
step clock brackets one optimizer step. No framework's own timing is trusted for the table.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
PHASES = ("generate", "weight_sync", "standby")  # everything else in a step is "train + rest"
# inside "train + rest": labelled so that device-memory peaks of training are told apart from the moments the
# inference engine's KV cache is mapped (before and during generation)
TRAINING_PHASES = ("logprob_pass", "forward_backward")


class PhaseClock:
    """Exclusive wall time per phase label.

    A call wrapped as phase P counts toward P, minus the time spent in wrapped calls it makes itself (TRL's
    weight sync calls ``LLM.wake_up(tags=["weights"])``, which is labelled too). ``synchronize`` (e.g.
    ``torch.cuda.synchronize``) runs when a phase ends, so queued GPU work is charged to the phase that queued
    it. ``on_change(label)`` hears the innermost active label (``"other"`` outside every phase).
    """

    def __init__(self, synchronize: Callable[[], None] | None = None,
                 on_change: Callable[[str], None] | None = None,
                 now: Callable[[], float] = time.perf_counter) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.generated_tokens = 0
        self._stack: list[list[Any]] = []  # [label, start, seconds in nested phases]
        self._synchronize = synchronize or (lambda: None)
        self._on_change = on_change or (lambda label: None)
        self._now = now

    @property
    def current(self) -> str:
        return self._stack[-1][0] if self._stack else "other"

    @contextmanager
    def phase(self, label: str):
        self._stack.append([label, self._now(), 0.0])
        self._on_change(label)
        try:
            yield
        finally:
            self._synchronize()
            entry = self._stack.pop()
            elapsed = self._now() - entry[1]
            self.totals[label] = self.totals.get(label, 0.0) + elapsed - entry[2]
            self.counts[label] = self.counts.get(label, 0) + 1
            if self._stack:
                self._stack[-1][2] += elapsed
            self._on_change(self.current)

    def wrap(self, owner: Any, method: str, label: str | Callable[..., str],
             after: Callable[[Any], None] | None = None) -> None:
        """Replaces ``owner.method`` (an instance attribute shadows the class's method) with a timed call.

        ``label`` may be a function of the call's arguments; ``after(result)`` runs on the result.
        """
        original = getattr(owner, method)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            name = label(*args, **kwargs) if callable(label) else label
            with self.phase(name):
                result = original(*args, **kwargs)
            if after is not None:
                after(result)
            return result

        setattr(owner, method, timed)

    def count_generated(self, outputs: Iterable[Any]) -> None:
        """Adds the completion tokens of vLLM ``RequestOutput``s (``outputs[i].outputs[j].token_ids``)."""
        self.generated_tokens += sum(len(c.token_ids) for o in outputs for c in o.outputs)

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)


def logprob_label(*args, **kwargs) -> str:
    """A log-prob computation under ``torch.no_grad()`` is the no-grad pass over the generation (old-policy
    log-probs for importance sampling); with gradients on it is the training forward."""
    import torch

    return "forward_backward" if torch.is_grad_enabled() else "logprob_pass"


def wake_up_label(*args, tags: list[str] | None = None, **kwargs) -> str:
    """``LLM.wake_up(tags=["weights"])`` re-maps weights that are about to be overwritten: part of the weight
    sync. Waking the KV cache (or everything) is standby."""
    tags = tags if tags is not None else (args[0] if args else None)
    return "weight_sync" if tags is not None and list(tags) == ["weights"] else "standby"


def device_used_reader(device_index: int = 0) -> tuple[Callable[[], int], str]:
    """A function returning the device's used bytes: NVML (device-wide, no CUDA context), else cudaMemGetInfo."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        return (lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)), "nvml"
    except Exception:  # noqa: BLE001 - no NVML: fall back to the CUDA runtime
        import torch

        def used() -> int:
            if not torch.cuda.is_initialized():
                return 0  # creating the CUDA context from this thread, before the framework does, is avoided
            free, total = torch.cuda.mem_get_info(device_index)
            return int(total - free)

        return used, "cudaMemGetInfo"


class DeviceMemorySampler:
    """Peak device memory in use, overall, per window (a step) and per phase label, polled on a daemon thread.

    Memory held by PyTorch's caching allocator stays "in use" until it is emptied, so a phase's high-water mark
    outlives short spikes; :meth:`sample` also runs synchronously at step ends.
    """

    def __init__(self, read: Callable[[], int], interval: float = 0.05) -> None:
        self._read = read
        self.interval = interval
        self.label = "other"
        self.peak = 0
        self.window_peak = 0
        self.phase_peaks: dict[str, int] = {}
        self.window_phase_peaks: dict[str, int] = {}
        self.first: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        used = self._read()
        with self._lock:
            if self.first is None:
                self.first = used
            self.peak = max(self.peak, used)
            self.window_peak = max(self.window_peak, used)
            self.phase_peaks[self.label] = max(self.phase_peaks.get(self.label, 0), used)
            self.window_phase_peaks[self.label] = max(self.window_phase_peaks.get(self.label, 0), used)
        return used

    def phase_peaks_gib(self) -> dict[str, float]:
        """Peak per phase label since the start, in GiB (a copy: the sampling thread keeps writing)."""
        with self._lock:
            return {label: peak / GIB for label, peak in self.phase_peaks.items()}

    def new_window(self) -> None:
        with self._lock:
            self.window_peak = 0
            self.window_phase_peaks = {}

    def start(self) -> DeviceMemorySampler:
        def loop() -> None:
            while not self._stop.wait(self.interval):
                try:
                    self.sample()
                except Exception:  # noqa: BLE001 - a failed read must not kill the run being measured
                    pass

        self._thread = threading.Thread(target=loop, name="device-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def label_follower(sampler: DeviceMemorySampler) -> Callable[[str], None]:
    """A :class:`PhaseClock` ``on_change`` that points ``sampler`` at the innermost active label, reading the
    device first: each phase's start and end are sampled and charged to the label that ends there, so a phase
    shorter than the polling interval still has its memory seen (PyTorch's cache keeps a phase's high-water
    mark in use until the phase ends)."""

    def on_change(label: str) -> None:
        try:
            sampler.sample()
        except Exception:  # noqa: BLE001 - a failed read must not stop the run being measured
            pass
        sampler.label = label

    return on_change


@dataclass
class StepRecorder:
    """One record per optimizer step: wall time, the phase clock's exclusive times, generated tokens, peaks.

    ``train_and_rest_s`` is the step minus generate, weight sync and standby (:data:`PHASES`): rewards, the
    no-grad log-prob pass, forward+backward, the optimizer step and each framework's bookkeeping. Labels other
    than :data:`PHASES` (the :data:`TRAINING_PHASES`) split it further but are not subtracted from it:
    ``logprob_pass_s`` and ``forward_backward_s`` are parts of ``train_and_rest_s``.
    """

    clock: PhaseClock
    sampler: DeviceMemorySampler | None = None
    synchronize: Callable[[], None] = lambda: None
    on_record: Callable[[dict[str, Any]], None] = lambda record: None
    now: Callable[[], float] = time.perf_counter
    steps: list[dict[str, Any]] = field(default_factory=list)
    _start: float | None = None
    _totals: dict[str, float] = field(default_factory=dict)
    _tokens: int = 0

    def begin(self) -> None:
        self.synchronize()
        self._totals = self.clock.snapshot()
        self._tokens = self.clock.generated_tokens
        if self.sampler is not None:
            self.sampler.sample()
            self.sampler.new_window()
        self._start = self.now()

    def end(self, **extra: Any) -> dict[str, Any]:
        if self._start is None:
            raise RuntimeError("StepRecorder.end() without begin()")
        self.synchronize()
        elapsed = self.now() - self._start
        self._start = None
        deltas = {k: v - self._totals.get(k, 0.0) for k, v in self.clock.totals.items()}
        record: dict[str, Any] = {"step_s": elapsed}
        for phase in PHASES:
            record[f"{phase}_s"] = deltas.get(phase, 0.0)
        # exclusive times partition the step, so the step minus the three non-training phases is everything else
        record["train_and_rest_s"] = elapsed - sum(deltas.get(phase, 0.0) for phase in PHASES)
        for phase in TRAINING_PHASES:
            record[f"{phase}_s"] = deltas.get(phase, 0.0)
        record["generated_tokens"] = self.clock.generated_tokens - self._tokens
        if self.sampler is not None:
            self.sampler.sample()
            record["peak_device_gib"] = self.sampler.window_peak / GIB
            record["phase_peak_device_gib"] = {label: peak / GIB
                                               for label, peak in self.sampler.window_phase_peaks.items()}
        record.update(extra)
        self.steps.append(record)
        self.on_record(record)
        return record


def trainer_step_callback(recorder: StepRecorder) -> Any:
    """A transformers ``TrainerCallback`` that brackets each optimizer step with ``recorder``.

    ``on_step_begin`` runs before the first micro-batch of a gradient-accumulation window, whose inputs
    trigger TRL's generation; ``on_step_end`` runs after ``optimizer.step()`` and ``zero_grad()``, before logging
    and saving.
    """
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            recorder.begin()

        def on_step_end(self, args, state, control, **kwargs):
            recorder.end()

    return StepClock()


def record_each_call(owner: Any, method: str, recorder: StepRecorder) -> None:
    """Brackets every call of ``owner.method`` with ``recorder.begin()`` / ``end()`` (rlcore: one call of
    ``GRPOTrainer.training_step`` is one optimizer step). The numeric entries of a returned metrics dict are
    kept with the record."""
    original = getattr(owner, method)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        recorder.begin()
        result = original(*args, **kwargs)
        numbers = {}
        if isinstance(result, dict):
            numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        recorder.end(framework_metrics=numbers)
        return result

    setattr(owner, method, timed)


def unique_weight_bytes(*modules: Any) -> dict[str, Any]:
    """Bytes of parameter storage per module and across all of them, each storage counted once.

    Storages are identified by (device, address): a view (rlcore's trainer layers are row slices of vLLM's
    fused tensors) adds nothing, a separate copy (TRL's training model next to vLLM's) adds its bytes again.
    """
    seen: dict[tuple[str, int], int] = {}
    per_module = []
    for module in modules:
        own: dict[tuple[str, int], int] = {}
        for parameter in module.parameters():
            storage = parameter.untyped_storage()
            key = (str(parameter.device), storage.data_ptr() or id(storage))
            own[key] = storage.nbytes()
        per_module.append(sum(own.values()))
        seen.update(own)
    return {"per_module_bytes": per_module, "unique_bytes": sum(seen.values()),
            "per_module_gib": [b / GIB for b in per_module], "unique_gib": sum(seen.values()) / GIB}


# ---------------------------------------------------------------------- synthetic rollouts (length probes)
@dataclass
class SyntheticLogprob:
    logprob: float
    rank: int = 1
    decoded_token: str | None = None


@dataclass
class SyntheticCompletion:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, SyntheticLogprob]]
    text: str = ""
    cumulative_logprob: float | None = None
    finish_reason: str = "length"
    stop_reason: Any = None


@dataclass
class SyntheticRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[SyntheticCompletion]
    prompt: str | None = None
    finished: bool = True


def synthetic_generate(token_ids: list[int], logprob: float, seed: int = 0) -> Callable[..., list]:
    """A stand-in for ``vllm.LLM.generate`` that returns ``max_tokens`` tokens drawn from ``token_ids`` per prompt,
    each reported with sampling log-probability ``logprob``, in vLLM's ``RequestOutput`` layout (what rlcore's
    engine and TRL's ``extract_logprobs`` read). For memory probes at lengths whose real generation would take
    longer than the probe: the engine's KV cache is allocated up front, so generation-phase memory does not
    depend on the length; training-phase memory is what the probe measures.
    """
    import numpy as np

    choices = np.asarray(sorted({int(t) for t in token_ids}), dtype=np.int64)
    if choices.size == 0:
        raise ValueError("synthetic_generate needs at least one token id to draw from")

    def generate(prompts, sampling_params=None, *args, **kwargs):
        params = sampling_params
        if params is None and args:
            params = args[0]
        outputs = []
        for index, prompt in enumerate(prompts):
            single = params[index] if isinstance(params, (list, tuple)) else params
            length = int(single.max_tokens)
            rng = np.random.default_rng(seed * 1_000_003 + index)
            tokens = [int(t) for t in rng.choice(choices, size=length)]
            entries = [{token: SyntheticLogprob(logprob)} for token in tokens]
            prompt_ids = list(prompt["prompt_token_ids"]) if isinstance(prompt, dict) else list(prompt)
            outputs.append(SyntheticRequestOutput(str(index), prompt_ids,
                                                  [SyntheticCompletion(0, tokens, entries)]))
        return outputs

    return generate


# ---------------------------------------------------------------------- failures
MEMORY_FAILURE_PATTERNS = (
    "out of memory",
    "outofmemoryerror",
    "no available memory for the cache blocks",
    "larger than the available kv cache memory",
    "less than desired gpu memory utilization",
    "insufficient memory",
    "cuda_error_out_of_memory",
)


def classify_failure(error_type: str, message: str) -> str:
    """``"oom"`` when an error says the GPU ran out of memory (PyTorch, CUDA, or vLLM sizing its KV cache /
    refusing its memory share), else ``"error"``."""
    text = f"{error_type}: {message}".lower()
    return "oom" if any(pattern in text for pattern in MEMORY_FAILURE_PATTERNS) else "error"
