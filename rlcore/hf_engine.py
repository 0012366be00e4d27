"""``HFEngine``: rollouts with transformers ``generate`` on the policy module itself (CPU, CI, no vLLM).

The engine samples from the very module being trained (a PEFT model with its LoRA adapters active), so
there is nothing to sync: every generation sees the current weights.

What a :class:`~rlcore.rollout.Rollout` holds:

* ``completion_ids``: the generated tokens up to and *including* the stop token that ended the completion
  (an ``eos``/``<|eot_id|>`` or one of ``SamplingSettings.stop_token_ids``), as vLLM's ``token_ids`` do; so
  the policy is trained on the decision to stop. Nothing after the stop token is returned. A completion cut
  by ``max_tokens`` ends with its last sampled token and has ``finish_reason == "length"``.
* ``logprobs``: one per completion token (the stop token included): ``log p(token)`` under the distribution
  the token was drawn from, i.e. the log-softmax of the logits after repetition penalty → temperature →
  top-k → top-p → min-p (transformers' order). Filtered-out tokens have probability 0, so with top-k/top-p
  the kept tokens' log-probabilities are renormalised. With ``greedy=True`` tokens are the argmax of the
  repetition-penalised logits, and the logprobs are the log-softmax of those logits (temperature 1, no filters).
* ``text``: the completion decoded with special tokens skipped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rlcore.rollout import Rollout, RolloutEngine, SamplingSettings, StandbyStats, SyncStats


class _SampledLogprobRecorder:
    """A logits processor placed last: remembers each step's final scores and, one step later, the log-prob
    of the token that was drawn from them.

    Keeping only the current step ([batch, vocab]) instead of ``output_scores`` (one [batch, vocab] tensor per
    generated token, 16 GB for 64 × 512 tokens of a 128k vocabulary) keeps memory flat in the completion length.
    """

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self._take(input_ids[:, -1])
        self.pending = scores
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        scores = self.pending.float()
        chosen = scores.gather(1, tokens.unsqueeze(1).to(scores.device)).squeeze(1)
        self.steps.append(chosen - torch.logsumexp(scores, dim=-1))
        self.pending = None

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """[batch, steps] log-probs once generation has ended (``last_tokens``: the final column)."""
        if self.pending is not None:
            self._take(last_tokens)
        if not self.steps:
            return torch.zeros((last_tokens.shape[0], 0))
        return torch.stack(self.steps, dim=1).cpu()


class HFEngine(RolloutEngine):
    """Generates with ``model.generate`` (KV cache, eval mode, no grad) on the live policy module.

    Args:
        model: the policy, usually a ``peft.PeftModel`` wrapping a ``*ForCausalLM``; it is used as is, not copied.
        tokenizer: its tokenizer; supplies the ``eos`` id, the pad id for batching, and decoding.
        max_batch_size: prompts per ``generate`` call (None: all at once). Lower it to bound KV-cache memory.
    """

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_batch_size: int | None = None) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r} is not allowed: expected an integer >= 1 or None")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        generation_config = getattr(self._generating_module(), "generation_config", None)
        self.default_stop_ids = _eos_ids(getattr(tokenizer, "eos_token_id", None),
                                         getattr(generation_config, "eos_token_id", None))

    # ------------------------------------------------------------------ RolloutEngine
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> list[Rollout]:
        _check(prompt_ids, sampling)
        if not prompt_ids:
            return []
        stop_ids = sorted(set(self.default_stop_ids) | {int(i) for i in sampling.stop_token_ids})
        if not stop_ids:
            raise ValueError("no stop token: the tokenizer has no eos_token_id and SamplingSettings.stop_token_ids "
                             "is empty, so generation could only end at max_tokens")
        size = self.max_batch_size or len(prompt_ids)
        rollouts: list[Rollout] = []
        with self._generation_mode(), _seeded(sampling.seed, self._device()):
            for start in range(0, len(prompt_ids), size):
                rollouts += self._generate_batch(prompt_ids[start:start + size], sampling, stop_ids)
        return rollouts

    def sleep(self) -> StandbyStats:
        # The KV cache of transformers' DynamicCache is freed when generate returns; on CUDA hand the cached
        # blocks back to the driver so training sees them.
        start = time.perf_counter()
        freed = 0
        if torch.cuda.is_available() and self._device().type == "cuda":
            before = torch.cuda.memory_reserved()
            torch.cuda.empty_cache()
            freed = before - torch.cuda.memory_reserved()
        return StandbyStats(seconds=time.perf_counter() - start, freed_bytes=freed)

    def sync_weights(self) -> SyncStats:
        # Generation runs on the trained module itself: its weights are always current.
        return SyncStats()

    # ------------------------------------------------------------------ internals
    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingSettings,
                        stop_ids: list[int]) -> list[Rollout]:
        from transformers import (GenerationConfig, LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)

        device = self._device()
        pad_id = self._pad_id(stop_ids)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1

        # The sampling warpers are passed as our own processors, not as GenerationConfig fields, because
        # transformers runs custom processors *before* its warpers; this way the recorder sees the final scores.
        processors: list[Any] = []
        if not sampling.greedy:
            if sampling.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                processors.append(TopKLogitsWarper(top_k=sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=sampling.top_p))
            if sampling.min_p > 0.0:
                processors.append(MinPLogitsWarper(min_p=sampling.min_p))
        recorder = _SampledLogprobRecorder()
        processors.append(recorder)
        # A model's generation_config.json (Llama-3-Instruct: temperature 0.6, top_p 0.9) must not leak into
        # the sampling: it is swapped for a blank one below, so only these values and transformers' global
        # defaults apply; of those only top_k (50) is not neutral, hence top_k=0 when sampling.
        config = GenerationConfig(
            max_new_tokens=sampling.max_tokens, min_new_tokens=0, do_sample=not sampling.greedy, num_beams=1,
            **({} if sampling.greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}),
            repetition_penalty=sampling.repetition_penalty,  # transformers skips left padding (prompt_ignore_length)
            eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True,  # use_cache: training may have turned it off
            return_dict_in_generate=False, output_scores=False, output_logits=False)
        target = self._generating_module()
        saved = target.generation_config
        target.generation_config = GenerationConfig()  # nothing inherited from the checkpoint's defaults
        try:
            sequences = target.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                        generation_config=config,
                                        logits_processor=LogitsProcessorList(processors))
        finally:
            target.generation_config = saved
        new_tokens = sequences[:, width:].cpu()
        logprobs = recorder.finish(sequences[:, -1])
        if logprobs.shape != new_tokens.shape:
            raise RuntimeError(f"recorded {tuple(logprobs.shape)} log-probs for {tuple(new_tokens.shape)} "
                               "generated tokens; this transformers version calls logits processors differently")
        stop_set = set(stop_ids)
        rollouts = []
        for row, prompt in enumerate(prompts):
            tokens = new_tokens[row].tolist()
            end = next((i + 1 for i, t in enumerate(tokens) if t in stop_set), None)
            finish_reason = "stop" if end is not None else "length"
            end = len(tokens) if end is None else end
            completion = tokens[:end]
            rollouts.append(Rollout(
                prompt_ids=list(prompt), completion_ids=completion,
                text=self.tokenizer.decode(completion, skip_special_tokens=True),
                logprobs=logprobs[row, :end].tolist(), finish_reason=finish_reason))
        return rollouts

    def _generating_module(self) -> torch.nn.Module:
        # With LoRA the adapters are injected into the base model's layers, so the base model's own generate
        # runs the adapted weights; calling it directly lets us control its generation_config.
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pad_id(self, stop_ids: list[int]) -> int:
        # Any id works for left padding (masked out). Finished rows are filled with it too; they are cut
        # at their stop token, so it never reaches a Rollout.
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else stop_ids[0]

    @contextlib.contextmanager
    def _generation_mode(self) -> Iterator[None]:
        """Eval mode (no dropout), no autograd graph; every submodule's train/eval flag restored afterwards."""
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, training in modes:
                module.training = training


def _eos_ids(*values: Any) -> list[int]:
    ids: set[int] = set()
    for value in values:
        if value is None:
            continue
        if isinstance(value, int):
            ids.add(value)
        else:
            ids.update(int(v) for v in value)
    return sorted(ids)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """With a seed: a private random stream (the caller's RNG state is restored afterwards)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check(prompt_ids: Sequence[Sequence[int]], sampling: SamplingSettings) -> None:
    for index, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty: every prompt needs at least one token")
    if sampling.max_tokens < 1:
        raise ValueError(f"max_tokens={sampling.max_tokens!r} is not allowed: expected an integer >= 1")
    if not sampling.greedy and not sampling.temperature > 0:
        raise ValueError(f"temperature={sampling.temperature!r} is not allowed: expected > 0 (use greedy=True "
                         "for argmax decoding)")
    if not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"top_p={sampling.top_p!r} is not allowed: expected 0 < top_p <= 1")
    if not 0.0 <= sampling.min_p <= 1.0:
        raise ValueError(f"min_p={sampling.min_p!r} is not allowed: expected 0 <= min_p <= 1")
    if sampling.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={sampling.repetition_penalty!r} is not allowed: expected > 0")
