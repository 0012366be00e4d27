"""Selective gradient checkpointing: recompute only the decoder layers whose activations do not fit.

With LoRA the base weights get no gradient, so backward costs about one forward (2N FLOPs per token); full
gradient checkpointing adds a second forward, 6N instead of 4N. When memory allows, leaving some layers out
of checkpointing removes their recomputation. A layer left out keeps everything its forward saves for
backward; a checkpointed layer keeps only its input hidden state.

* :func:`saved_bytes_per_layer` measures, for a given batch, what one un-checkpointed decoder layer saves
  (distinct storages handed to autograd, parameters excluded) by running the model's forward once with a
  ``saved_tensors_hooks`` counter around layer 0.
* :func:`plan_checkpointing` turns a memory budget into the number of layers to leave out.
* :func:`set_checkpointed_layers` applies it: the *last* layers are left out, because backward reaches them
  first (their memory is released before any recomputation runs), which keeps the peak lowest.

Written against transformers 5.17 – 5.24: decoder layers are ``GradientCheckpointingLayer`` instances whose
``gradient_checkpointing`` attribute (set by ``gradient_checkpointing_enable``) is read on every call; those
accesses go through :mod:`rlcore.kernels.transformers_compat`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import transformers_compat


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list of an HF causal LM (PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(transformers_compat.is_checkpointing_layer(layer)
                                                        for layer in layers):
        raise ValueError(f"{type(base).__name__} has no decoder layers with a gradient_checkpointing switch")
    return layers


def set_checkpointed_layers(model: nn.Module, left_out: int) -> list[int]:
    """Checkpoints every decoder layer except the last ``left_out``; returns the indices left out.

    The model must have gradient checkpointing enabled (``gradient_checkpointing_enable``) so that the
    checkpointing function is installed on each layer.
    """
    layers = decoder_layers(model)
    if not 0 <= left_out <= len(layers):
        raise ValueError(f"left_out={left_out} must be between 0 and the number of layers ({len(layers)})")
    if not any(transformers_compat.layer_has_checkpointing_function(layer) for layer in layers):
        raise ValueError("gradient checkpointing is not enabled on this model (call gradient_checkpointing_enable)")
    first_left_out = len(layers) - left_out
    for index, layer in enumerate(layers):
        transformers_compat.set_layer_checkpointing(layer, index < first_left_out)
    return list(range(first_left_out, len(layers)))


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one decoder layer keeps for backward at one batch shape."""

    full: int  # left out of checkpointing: everything its forward saves
    checkpointed: int  # checkpointed: its input hidden state

    @property
    def saving(self) -> int:
        return max(self.full - self.checkpointed, 0)


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts distinct storages saved for backward while ``active``. Parameters (and views of them, such as
    a transposed weight) are not activations: storages in ``exclude`` are skipped."""

    def __init__(self, exclude: set[int]) -> None:
        self.active = False
        self.exclude = exclude
        self.storages: dict[int, int] = {}
        super().__init__(self._pack, lambda packed: packed)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.exclude:
                self.storages[storage.data_ptr()] = storage.nbytes()
        # not the tensor itself: a saved output would then hold its own grad_fn, a cycle through C++ that
        # the garbage collector cannot see (the whole graph would leak)
        return tensor.detach()


def saved_bytes_per_layer(model: nn.Module, input_ids: torch.Tensor, **forward_kwargs) -> LayerMemory:
    """Runs ``model``'s decoder once on ``input_ids`` with layer 0 un-checkpointed and measures what it saves.

    The graph is discarded (no backward). ``forward_kwargs`` go to the decoder (attention mask, positions, …)
    so that the measurement sees the training forward's exact shapes and attention path.
    """
    layers = decoder_layers(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    first = layers[0]
    counter = _SavedBytes({p.untyped_storage().data_ptr() for p in model.parameters()}
                          | {b.untyped_storage().data_ptr() for b in model.buffers()})
    hidden_bytes: list[int] = []

    def start(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden_bytes.append(hidden.numel() * hidden.element_size())
        counter.active = True

    def stop(_module, _args, _output):
        counter.active = False

    was_checkpointed, was_training = transformers_compat.layer_checkpointing(first), decoder.training
    handles = [first.register_forward_pre_hook(start, with_kwargs=True), first.register_forward_hook(stop)]
    transformers_compat.set_layer_checkpointing(first, False)
    try:
        decoder.train()
        with torch.enable_grad(), counter, transformers_compat.quiet_renamed_checkpointing_warning():
            out = decoder(input_ids=input_ids, use_cache=False, **forward_kwargs)
        del out
    finally:
        for handle in handles:
            handle.remove()
        transformers_compat.set_layer_checkpointing(first, was_checkpointed)
        decoder.train(was_training)
    if not hidden_bytes:
        raise RuntimeError("layer 0 did not run during the measuring forward")
    return LayerMemory(full=sum(counter.storages.values()), checkpointed=hidden_bytes[0])


def plan_checkpointing(num_layers: int, memory: LayerMemory, budget_bytes: float) -> int:
    """How many layers to leave out of checkpointing so that their extra saved activations fit the budget."""
    if budget_bytes < 0 or math.isnan(budget_bytes):
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    if memory.saving == 0:
        return num_layers
    return int(min(num_layers, budget_bytes // memory.saving))
