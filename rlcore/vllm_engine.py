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

Written against vllm 0.26.0; the few internals used (worker object, CuMemAllocator handles, the LoRA manager) are
in the "vLLM internals" section at the bottom.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from rlcore.config import GRPOConfig, ModelConfig
from rlcore.rollout import Rollout, RolloutEngine, SamplingSettings

logger = logging.getLogger("rlcore")

# vLLM only accepts these LoRA slot ranks; a smaller policy rank uses the next one up (extra columns stay 0).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_LORA_ID = 1
_LORA_NAME = "rlcore-policy"
GIB = 2**30


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
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise RuntimeError("VLLMEngine shares vLLM's weights with the trainer, so vLLM must run in this "
                               "process: unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0")
        # Read by vLLM when the engine is created: keep the engine core in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if model_config.dtype == "float8":
            raise ValueError("dtype='float8' is not supported by VLLMEngine's shared weights yet; use 'bfloat16'")
        if not torch.cuda.is_available():
            raise RuntimeError("VLLMEngine needs a CUDA GPU; use engine='hf' on this machine")
        from vllm import LLM

        self.model_config = model_config
        self.grpo_config = grpo_config
        self.tokenizer = tokenizer
        self.ignore_eos = ignore_eos
        self.standby = bool(model_config.standby)
        self.max_lora_rank = slot_rank(model_config.lora_r)
        kwargs: dict[str, Any] = dict(
            model=model_config.model_name_or_path,
            dtype=model_config.dtype,
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
        kwargs.update(llm_kwargs)
        start = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.init_seconds = time.perf_counter() - start
        self._worker = _driver_worker(self.llm)
        self._asleep = False
        self._slots: list[_SlotCopy] = []
        self._policy: Any = None
        self.lora_request: Any = None
        self.shared_model: torch.nn.Module | None = None
        logger.info("vLLM engine ready in %.1f s: KV cache %s tokens", self.init_seconds, self.kv_cache_tokens)

    # ------------------------------------------------------------------ model objects
    @property
    def vllm_model(self) -> torch.nn.Module:
        """vLLM's live model (LoRA-wrapped layers included)."""
        return self.llm.apply_model(lambda model: model)[0]

    @property
    def kv_cache_tokens(self) -> int | None:
        """How many tokens of KV cache vLLM allocated (num_gpu_blocks × block_size)."""
        for config in (getattr(self.llm.llm_engine, "vllm_config", None),
                       getattr(self._worker, "vllm_config", None)):
            cache = getattr(config, "cache_config", None)
            if cache is not None and cache.num_gpu_blocks:
                return int(cache.num_gpu_blocks) * int(cache.block_size)
        return None

    def hf_config(self):
        """The transformers config of the served checkpoint."""
        return self.llm.llm_engine.model_config.hf_config

    def build_shared_model(self) -> torch.nn.Module:
        """A transformers causal LM whose every frozen weight is a view of vLLM's tensors (no copy)."""
        from rlcore.shared_weights import DEFAULT_PACKED_MODULES, build_shared_model

        source = self.vllm_model
        packed = getattr(source, "packed_modules_mapping", None) or DEFAULT_PACKED_MODULES
        model = build_shared_model(source, self.hf_config(), dtype=self.model_config.torch_dtype,
                                   packed={k: tuple(v) for k, v in packed.items()},
                                   attn_implementation=self.model_config.attn_implementation)
        self.shared_model = model
        return model

    # ------------------------------------------------------------------ LoRA
    def attach_policy(self, peft_model: Any) -> None:
        """Registers the policy's LoRA in vLLM and maps its A/B onto vLLM's slot tensors; syncs once."""
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
        _register_pinned_adapter(self._worker, self.lora_request, self.max_lora_rank)
        self._slots = self._map_slots(peft_model, adapter)
        self._policy = peft_model
        self.sync_weights()

    def _map_slots(self, peft_model: Any, adapter: str) -> list[_SlotCopy]:
        source = self.vllm_model
        packed = dict(getattr(source, "packed_modules_mapping", None) or {})
        peft_layers = {}
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {}):
                # "base_model.model.model.layers.0.self_attn.q_proj" → "model.layers.0.self_attn.q_proj"
                peft_layers[name.removeprefix("base_model.model.")] = module
        slot = _lora_slot_index(self._worker, _LORA_ID)
        copies: list[_SlotCopy] = []
        used = set()
        for name, module in source.named_modules():
            if not hasattr(module, "lora_a_stacked"):
                continue
            a_slices, b_slices = module.lora_a_stacked, module.lora_b_stacked
            if not isinstance(a_slices, (tuple, list)):
                continue  # embedding / logits-processor wrappers (one tensor): LoRA there is rejected above
            parent, _, leaf = name.rpartition(".")
            parts = packed.get(leaf, [leaf])
            if len(parts) != len(a_slices):
                raise ValueError(f"vLLM layer {name} has {len(a_slices)} LoRA slices, expected {len(parts)} "
                                 f"({parts})")
            with torch.inference_mode():
                for i in range(len(a_slices)):  # a stale adapter must not leak into untargeted slices
                    a_slices[i][slot].zero_()
                    b_slices[i][slot].zero_()
            for i, part in enumerate(parts):
                layer = peft_layers.get(f"{parent}.{part}" if parent else part)
                if layer is None:
                    continue
                lora_a = layer.lora_A[adapter].weight  # [r, in]
                lora_b = layer.lora_B[adapter].weight  # [out, r]
                target_a = a_slices[i][slot, 0, : lora_a.shape[0], : lora_a.shape[1]]
                target_b = b_slices[i][slot, 0, : lora_b.shape[0], : lora_b.shape[1]]
                if lora_a.shape[1] != a_slices[i].shape[-1] or lora_b.shape[0] != b_slices[i].shape[-2]:
                    raise ValueError(f"{parent}.{part}: PEFT A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} do "
                                     f"not fit vLLM's slots {tuple(a_slices[i].shape)} / {tuple(b_slices[i].shape)}")
                scale = float(layer.scaling[adapter])
                copies.append(_SlotCopy(f"{parent}.{part}.lora_A", lora_a, target_a, 1.0))
                copies.append(_SlotCopy(f"{parent}.{part}.lora_B", lora_b, target_b, scale))
                used.add(f"{parent}.{part}" if parent else part)
        missing = sorted(set(peft_layers) - used)
        if missing:
            raise ValueError(f"PEFT LoRA layers with no vLLM LoRA slot: {missing[:5]}")
        if not copies:
            raise ValueError("no PEFT LoRA layer matched a vLLM LoRA layer")
        return copies

    def sync_weights(self) -> dict:
        """Copies the policy's LoRA A and B·scaling into vLLM's slots, on the GPU; returns seconds, bytes."""
        if not self._slots:
            return {"seconds": 0.0, "bytes": 0}
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
        # KV blocks cached for earlier prompts were computed with the previous adapter.
        self.llm.reset_prefix_cache()
        return {"seconds": time.perf_counter() - start, "bytes": moved, "tensors": len(self._slots)}

    # ------------------------------------------------------------------ generation
    def sampling_params(self, sampling: SamplingSettings, index: int = 0):
        """vLLM ``SamplingParams`` for one prompt (``index`` offsets the seed: repeated prompts must differ)."""
        from vllm import SamplingParams

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
                logprobs=_sampled_logprobs(completion.logprobs, tokens),
                finish_reason="length" if completion.finish_reason == "length" else "stop"))
        if self.tokenizer is not None:
            texts = self.tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
            for rollout, text in zip(rollouts, texts):
                rollout.text = text
        return rollouts

    # ------------------------------------------------------------------ standby
    def sleep(self) -> dict:
        """Releases vLLM's KV cache (weights stay); returns ``sleep_seconds`` and ``freed_gib``."""
        if not self.standby or self._asleep:
            return {"sleep_seconds": 0.0, "freed_bytes": 0, "freed_gib": 0.0}
        start = time.perf_counter()
        # Prefix-cache entries would point at KV blocks whose memory is about to be discarded.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running); not releasing KV")
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        released = _release_kv_cache()
        free_after = torch.cuda.mem_get_info()[0]
        self._asleep = True
        return {"sleep_seconds": time.perf_counter() - start, "freed_bytes": released, "freed_gib": released / GIB,
                "freed_device_gib": (free_after - free_before) / GIB}

    def wake(self) -> dict:
        """Re-maps the KV cache released by :meth:`sleep`; returns ``wake_seconds``."""
        if not self.standby or not self._asleep:
            return {"wake_seconds": 0.0}
        start = time.perf_counter()
        # The trainer's freed activations sit in PyTorch's cache; hand them back so the KV cache can be mapped.
        gc.collect()
        torch.cuda.empty_cache()
        _wake_kv_cache(self._worker)
        self._asleep = False
        return {"wake_seconds": time.perf_counter() - start}

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


def _sampled_logprobs(logprobs: Any, tokens: list[int]) -> list[float]:
    """The sampled token's logprob at each position (vLLM always includes it, whatever its rank)."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no logprobs (SamplingParams.logprobs=0 was expected)")
    flat = getattr(logprobs, "start_indices", None)
    out = []
    if flat is not None:
        for position, token in enumerate(tokens):
            begin, end = logprobs.start_indices[position], logprobs.end_indices[position]
            ids = logprobs.token_ids[begin:end]
            out.append(float(logprobs.logprobs[begin + ids.index(token)]))
        return out
    return [float(step[token].logprob) for step, token in zip(logprobs, tokens)]


# ---------------------------------------------------------------------- vLLM internals (0.26.0)
# No public vLLM API releases the KV cache alone (LLM.sleep(level=1) also copies the weights to CPU, level 2
# discards them, and the trainer is reading them), or registers an adapter from memory. These helpers touch the
# in-process worker, the CuMemAllocator's handles and the worker's LoRA manager directly.

def _driver_worker(llm: Any) -> Any:
    """The in-process GPU worker (``collective_rpc`` with a callable runs it on the worker wrapper)."""
    wrapper = llm.collective_rpc(lambda self: self)[0]
    return getattr(wrapper, "worker", wrapper)


def _release_kv_cache() -> int:
    """Unmaps every live "kv_cache" allocation of the CuMemAllocator; returns the bytes released."""
    from vllm.device_allocator.cumem import CuMemAllocator, unmap_and_release

    allocator = CuMemAllocator.get_instance()
    released = 0
    for data in allocator.pointer_to_data.values():
        if data.tag == "kv_cache" and not data.is_asleep:
            unmap_and_release(data.handle)
            data.is_asleep = True
            released += data.handle[1]
    if not released:
        raise RuntimeError("no KV-cache allocation found in vLLM's CuMemAllocator (was enable_sleep_mode set?)")
    gc.collect()
    torch.cuda.empty_cache()
    return released


def _wake_kv_cache(worker: Any) -> None:
    from vllm.device_allocator.cumem import CuMemAllocator

    CuMemAllocator.get_instance().wake_up(tags=["kv_cache"])
    # FP8 KV caches need their scales reset after a wake-up; a no-op for 16-bit caches.
    worker.model_runner.post_kv_cache_wake_up()


def _lora_manager(worker: Any) -> Any:
    manager = getattr(worker.model_runner, "lora_manager", None)
    if manager is None:
        raise RuntimeError("vLLM was started without enable_lora")
    return manager


def _register_pinned_adapter(worker: Any, request: Any, rank: int) -> None:
    """Adds a zero LoRA of ``rank`` under ``request``'s id from memory and pins it in a GPU slot.

    A request carrying this id then finds the adapter loaded and never reads ``lora_path``; pinning keeps it
    from being evicted, which would reload the zero weights over the synced ones.
    """
    manager = _lora_manager(worker)
    if request.lora_int_id not in manager.list_adapters():
        manager.add_dummy_lora(request, rank=rank)
    manager.pin_adapter(request.lora_int_id)


def _lora_slot_index(worker: Any, lora_id: int) -> int:
    adapter_manager = _lora_manager(worker)._adapter_manager
    return list(adapter_manager.lora_index_to_id).index(lora_id)
