"""VLLMEngine: in-process vLLM that owns the only copy of the base weights, with LoRA synced in place.

One process holds one ``vllm.LLM`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so its live model object is reachable:

* :meth:`VLLMEngine.build_shared_model` builds the transformers model around vLLM's tensors
  (:mod:`rlcore.shared_weights`): the trainer's frozen weights are views, zero bytes copied.
* :meth:`VLLMEngine.attach_policy` registers one in-memory LoRA adapter of the policy's rank, pins it in vLLM's
  single GPU LoRA slot, and maps every PEFT ``lora_A``/``lora_B`` onto vLLM's ``lora_a_stacked``/``lora_b_stacked``
  slot tensors (q/k/v go to the three slices of ``qkv_proj``, gate/up to the two of ``gate_up_proj``).
* :meth:`VLLMEngine.sync_weights` copies the trained A/B into those slots on the GPU (B times PEFT's scaling,
  which vLLM folds into B when it loads an adapter), then drops the prefix cache, whose KV was computed with the
  old adapter.
* :meth:`VLLMEngine.sleep` / :meth:`VLLMEngine.wake` ("standby") release and re-map only the KV-cache allocations
  of vLLM's CuMemAllocator; the weights stay where they are, shared with the trainer.

Sampling log-probabilities come from vLLM's ``logprobs_mode="processed_logprobs"``: the log-probability of each
sampled token under the distribution it was actually drawn from (after temperature, top-k, top-p, min-p). With
top-k/top-p/min-p off this is ``log_softmax(logits / T)``, what the trainer recomputes, so the truncated importance
sampling ratio compares like with like. (The default "raw_logprobs" ignores the temperature.) For greedy requests
vLLM reports ``log_softmax(logits)``.

Written against vllm 0.26.0; every vLLM internal used (worker object, CuMemAllocator handles, the LoRA manager and
slot layout, FlatLogprobs) is reached through :mod:`rlcore.vllm_compat`, which refuses other vLLM versions.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from rlcore import distributed, vllm_compat
from rlcore.config import GRPOConfig, ModelConfig
from rlcore.rollout import Rollout, RolloutEngine, SamplingSettings, StandbyStats, SyncStats

logger = logging.getLogger("rlcore")

# vLLM only accepts these LoRA slot ranks; a smaller policy rank uses the next one up (extra columns stay 0).
VLLM_LORA_RANKS = vllm_compat.LORA_RANKS
_LORA_ID = 1
_LORA_NAME = "rlcore-policy"
# free memory wanted beyond the released KV cache before mapping it back without emptying PyTorch's cache
_WAKE_MARGIN_BYTES = 512 * 2**20


@dataclass
class _SlotCopy:
    """One PEFT tensor → one vLLM LoRA slot view (``scale`` multiplies B: vLLM stores B·alpha/r)."""

    name: str
    source: torch.nn.Parameter
    target: torch.Tensor
    scale: float


def slot_rank(rank: int) -> int:
    """The smallest LoRA rank vLLM accepts that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"lora_r={rank} is larger than vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]})")


class VLLMEngine(RolloutEngine):
    """Rollouts from an in-process ``vllm.LLM`` that shares its weights with the LoRA trainer.

    Args:
        model_config: model path, dtype, LoRA rank, ``gpu_memory_utilization``, ``standby``, ``enforce_eager``,
            ``max_seq_length`` (vLLM's ``max_model_len``).
        grpo_config: only ``seed`` is read (vLLM's engine seed).
        tokenizer: decodes completions into ``Rollout.text``; without one ``text`` is ``""``. vLLM itself never
            tokenizes (prompts are token ids, ``skip_tokenizer_init=True``).
        load_format: vLLM's ``load_format``; ``"dummy"`` gives random weights of the checkpoint's shapes
            (benchmarks: only ``config.json`` is needed).
        ignore_eos: keep generating past EOS / stop tokens (benchmarks with fixed lengths).
        llm_kwargs: passed on to ``vllm.LLM`` (override anything above).
    """

    name = "vllm"

    def __init__(self, model_config: ModelConfig, grpo_config: GRPOConfig | None = None, tokenizer: Any = None,
                 *, load_format: str = "auto", ignore_eos: bool = False, **llm_kwargs: Any) -> None:
        vllm_compat.keep_engine_in_process()
        if not torch.cuda.is_available():
            raise RuntimeError("VLLMEngine needs a CUDA GPU; use engine='hf' on this machine")
        LLM = vllm_compat.import_vllm().LLM

        self.model_config = model_config
        self.grpo_config = grpo_config
        self.tokenizer = tokenizer
        self.ignore_eos = ignore_eos
        self.standby = bool(model_config.standby)
        self.max_lora_rank = slot_rank(model_config.lora_r)
        kwargs: dict[str, Any] = dict(
            model=model_config.model_name_or_path,
            dtype="bfloat16" if model_config.dtype == "float8" else model_config.dtype,
            seed=grpo_config.seed if grpo_config is not None else 0,
            gpu_memory_utilization=model_config.gpu_memory_utilization,
            max_model_len=model_config.max_seq_length,
            enforce_eager=model_config.enforce_eager,
            enable_sleep_mode=self.standby,  # puts weights and KV cache in the CuMemAllocator (tags)
            enable_lora=True,
            max_lora_rank=self.max_lora_rank,
            max_loras=1,
            max_cpu_loras=1,
            logprobs_mode="processed_logprobs",
            skip_tokenizer_init=True,
            load_format=load_format,
            trust_remote_code=model_config.trust_remote_code,
        )
        if model_config.dtype == "float8":
            # vLLM quantizes the projections to FP8 as it loads them (bf16 activations), or reads a per-tensor FP8
            # checkpoint's (config.json says quant_method "fp8" too); the trainer's layers are views of those FP8
            # weights and scales (rlcore.fp8_weights)
            kwargs["quantization"] = "fp8"
        # under torchrun: this rank's own engine on its own GPU, inside the job's process group ({} otherwise)
        kwargs.update(distributed.vllm_engine_kwargs(kwargs["seed"]))
        kwargs.update(llm_kwargs)
        start = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.init_seconds = time.perf_counter() - start
        self._worker = vllm_compat.driver_worker(self.llm)
        self._asleep = False
        # True: standby as first written (a collection and a cache emptying on each sleep and wake, vLLM's own
        # wake_up, a prefix-cache reset on every sync); benchmarks/rl_step.py times it against the current path
        self._legacy_standby = False
        self._slots: list[_SlotCopy] = []
        self._policy: Any = None
        self.lora_request: Any = None
        self.shared_model: torch.nn.Module | None = None
        logger.info("vLLM engine ready in %.1f s: KV cache %s tokens", self.init_seconds, self.kv_cache_tokens)

    # ------------------------------------------------------------------ model objects
    @property
    def vllm_model(self) -> torch.nn.Module:
        """vLLM's live model (LoRA-wrapped layers included)."""
        return vllm_compat.live_model(self.llm)

    @property
    def kv_cache_tokens(self) -> int | None:
        """How many tokens of KV cache vLLM allocated (num_gpu_blocks × block_size)."""
        return vllm_compat.kv_cache_tokens(self.llm, self._worker)

    def hf_config(self):
        """The transformers config of the served checkpoint."""
        return vllm_compat.hf_config(self.llm)

    def build_shared_model(self) -> torch.nn.Module:
        """A transformers causal LM whose every frozen weight is a view of vLLM's tensors (no copy)."""
        from rlcore.shared_weights import build_shared_model

        source = self.vllm_model
        model = build_shared_model(source, self.hf_config(), dtype=self.model_config.torch_dtype,
                                   packed=vllm_compat.packed_modules(source),
                                   attn_implementation=self.model_config.attn_implementation)
        if self.model_config.dtype == "float16":
            # the residual stream is what passes float16's 65,504 first: the trainer keeps it in float32
            from rlcore.kernels.fp16_stability import keep_residual_fp32

            keep_residual_fp32(model)
        self.shared_model = model
        return model

    # ------------------------------------------------------------------ LoRA
    def attach_policy(self, peft_model: Any) -> None:
        """Registers the policy's LoRA in vLLM and maps its A/B onto vLLM's slot tensors; syncs once."""
        vllm_compat.import_vllm()
        from vllm.lora.request import LoRARequest

        adapter = getattr(peft_model, "active_adapter", "default")
        adapter = adapter if isinstance(adapter, str) else adapter[0]
        config = peft_model.peft_config[adapter]
        rank = int(config.r)
        if rank > self.max_lora_rank:
            raise ValueError(f"the policy's LoRA rank {rank} is larger than the engine's LoRA slots "
                             f"({self.max_lora_rank}); build the engine with lora_r={rank}")
        if getattr(config, "use_dora", False):
            raise ValueError("DoRA adapters can not be served from vLLM's LoRA slots; use plain LoRA")
        unsupported = [m for m in (config.target_modules or ()) if m in ("lm_head", "embed_tokens")]
        if unsupported:
            raise ValueError(f"LoRA on {unsupported} is not supported by VLLMEngine; target the projections")
        self.lora_request = LoRARequest(_LORA_NAME, _LORA_ID, "rlcore://in-memory")
        vllm_compat.register_pinned_adapter(self._worker, self.lora_request, self.max_lora_rank)
        self._slots = self._map_slots(peft_model, adapter)
        self._policy = peft_model
        self.sync_weights()

    def _map_slots(self, peft_model: Any, adapter: str) -> list[_SlotCopy]:
        source = self.vllm_model
        packed = vllm_compat.packed_modules(source)
        peft_layers = {}
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {}):
                # "base_model.model.model.layers.0.self_attn.q_proj" → "model.layers.0.self_attn.q_proj"
                peft_layers[name.removeprefix("base_model.model.")] = module
        slot = vllm_compat.lora_slot_index(self._worker, _LORA_ID)
        copies: list[_SlotCopy] = []
        used = set()
        # embedding / logits-processor wrappers are not listed: LoRA there is rejected above
        for name, a_slices, b_slices in vllm_compat.lora_wrapped_layers(source):
            parent, _, leaf = name.rpartition(".")
            parts = packed.get(leaf, (leaf,))
            if len(parts) != len(a_slices):
                raise ValueError(f"vLLM layer {name} has {len(a_slices)} LoRA slices, expected {len(parts)} "
                                 f"({parts})")
            vllm_compat.clear_lora_slot(a_slices, b_slices, slot)
            for i, part in enumerate(parts):
                layer = peft_layers.get(f"{parent}.{part}" if parent else part)
                if layer is None:
                    continue
                lora_a = layer.lora_A[adapter].weight  # [r, in]
                lora_b = layer.lora_B[adapter].weight  # [out, r]
                try:
                    target_a, target_b = vllm_compat.lora_slot_views(a_slices[i], b_slices[i], slot, lora_a.shape,
                                                                     lora_b.shape)
                except ValueError as error:
                    raise ValueError(f"{parent}.{part}: {error}") from None
                scale = vllm_compat.lora_b_slot_scale(layer.scaling[adapter])
                copies.append(_SlotCopy(f"{parent}.{part}.lora_A", lora_a, target_a, 1.0))
                copies.append(_SlotCopy(f"{parent}.{part}.lora_B", lora_b, target_b, scale))
                used.add(f"{parent}.{part}" if parent else part)
        missing = sorted(set(peft_layers) - used)
        if missing:
            raise ValueError(f"PEFT LoRA layers with no vLLM LoRA slot: {missing[:5]}")
        if not copies:
            raise ValueError("no PEFT LoRA layer matched a vLLM LoRA layer")
        return copies

    def sync_weights(self) -> SyncStats:
        """Copies the policy's LoRA A and B·scaling into vLLM's slots, on the GPU."""
        if not self._slots:
            return SyncStats()
        start = time.perf_counter()
        moved = 0
        # The slots may be inference tensors (vLLM allocates under inference_mode); writing them needs it too.
        with torch.inference_mode():
            for copy in self._slots:
                value = copy.source.detach()
                if copy.scale != 1.0:
                    value = value * copy.scale  # in the adapter's precision, one rounding to the slot dtype
                copy.target.copy_(value)
                moved += copy.target.numel() * copy.target.element_size()
        torch.cuda.synchronize()
        # KV blocks cached for earlier prompts were computed with the previous adapter. Asleep, there are none:
        # sleep() emptied the prefix cache and nothing was generated since (generate() wakes first).
        if not self._asleep or self._legacy_standby:
            self.llm.reset_prefix_cache()
        return SyncStats(seconds=time.perf_counter() - start, bytes=moved, tensors=len(self._slots))

    # ------------------------------------------------------------------ generation
    def sampling_params(self, sampling: SamplingSettings, index: int = 0):
        """vLLM ``SamplingParams`` for one prompt (``index`` offsets the seed: repeated prompts must differ)."""
        SamplingParams = vllm_compat.import_vllm().SamplingParams

        greedy = sampling.greedy
        return SamplingParams(
            n=1,
            max_tokens=sampling.max_tokens,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy or sampling.top_k <= 0 else sampling.top_k,
            min_p=0.0 if greedy else sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=self.ignore_eos,
            seed=None if sampling.seed is None or greedy else sampling.seed + index,
            logprobs=0,  # the sampled token's own logprob
            flat_logprobs=True,
            detokenize=False,
        )

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> list[Rollout]:
        if self._asleep:
            self.wake()  # generating into an unmapped KV cache would fault
        if not prompt_ids:
            return []
        params = [self.sampling_params(sampling, i) for i in range(len(prompt_ids))]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        rollouts = []
        for ids, output in zip(prompt_ids, outputs):
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            rollouts.append(Rollout(
                prompt_ids=list(ids), completion_ids=tokens, text="",
                logprobs=vllm_compat.sampled_logprobs(completion.logprobs, tokens),
                finish_reason="length" if completion.finish_reason == "length" else "stop"))
        if self.tokenizer is not None:
            texts = self.tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
            for rollout, text in zip(rollouts, texts):
                rollout.text = text
        return rollouts

    # ------------------------------------------------------------------ standby
    def sleep(self) -> StandbyStats:
        """Releases vLLM's KV cache (weights stay): reset the prefix cache, wait for the device, unmap."""
        if not self.standby or self._asleep:
            return StandbyStats()
        start = time.perf_counter()
        # Prefix-cache entries would point at KV blocks whose memory is about to be discarded (required: without
        # the reset the next generation reads garbage where it expects cached prefixes).
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running); not releasing KV")
        reset_seconds = time.perf_counter() - start
        torch.cuda.synchronize()  # no kernel may still read the KV cache when it is unmapped
        free_before = torch.cuda.mem_get_info()[0]
        unmap_start = time.perf_counter()
        released = vllm_compat.release_kv_cache()
        unmap_seconds = time.perf_counter() - unmap_start
        empty_seconds = 0.0
        if self._legacy_standby:
            empty_start = time.perf_counter()
            gc.collect()
            torch.cuda.empty_cache()
            empty_seconds = time.perf_counter() - empty_start
        free_after = torch.cuda.mem_get_info()[0]
        self._asleep = True
        return StandbyStats(seconds=time.perf_counter() - start, freed_bytes=released,
                            device_freed_bytes=free_after - free_before, reset_prefix_cache_seconds=reset_seconds,
                            unmap_seconds=unmap_seconds, empty_cache_seconds=empty_seconds)

    def wake(self) -> StandbyStats:
        """Maps the KV cache released by :meth:`sleep` back.

        PyTorch's cached blocks (the trainer's freed activations) are handed back to the device only when the
        free memory does not hold the KV cache; kept, the next training step reuses them without asking the
        driver again. Should the mapping still run out of memory, a garbage collection (tensors held by
        reference cycles) and a second emptying precede one retry.
        """
        if not self.standby or not self._asleep:
            return StandbyStats()
        start = time.perf_counter()
        if self._legacy_standby:
            gc.collect()
            torch.cuda.empty_cache()
            empty_seconds = time.perf_counter() - start
            vllm_compat.wake_kv_cache(self._worker)
            self._asleep = False
            return StandbyStats(seconds=time.perf_counter() - start, empty_cache_seconds=empty_seconds,
                                map_seconds=time.perf_counter() - start - empty_seconds)
        empty_seconds = 0.0
        if torch.cuda.mem_get_info()[0] < vllm_compat.released_kv_cache_bytes() + _WAKE_MARGIN_BYTES:
            torch.cuda.empty_cache()
            empty_seconds = time.perf_counter() - start
        map_start, retry_seconds = time.perf_counter(), 0.0
        try:
            vllm_compat.map_kv_cache(self._worker)
        except RuntimeError as error:
            retry_start = time.perf_counter()
            gc.collect()
            torch.cuda.empty_cache()
            retry_seconds = time.perf_counter() - retry_start
            try:
                vllm_compat.map_kv_cache(self._worker)  # maps what the first attempt did not
            except RuntimeError:
                free = torch.cuda.mem_get_info()[0]
                raise RuntimeError(
                    f"could not map vLLM's KV cache back ({vllm_compat.released_kv_cache_bytes() / 2**30:.2f} GiB "
                    f"still released, {free / 2**30:.2f} GiB free on the device): tensors made during training are "
                    "still alive. Lower gpu_memory_utilization, or free what your code keeps between steps."
                ) from error
        map_seconds = time.perf_counter() - map_start - retry_seconds
        self._asleep = False
        return StandbyStats(seconds=time.perf_counter() - start, empty_cache_seconds=empty_seconds + retry_seconds,
                            map_seconds=map_seconds)

    @property
    def asleep(self) -> bool:
        return self._asleep

    def close(self) -> None:
        if getattr(self, "llm", None) is None:
            return
        self._slots = []
        self.llm = None
        self._worker = None
        gc.collect()
        torch.cuda.empty_cache()
