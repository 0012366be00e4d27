"""Keeping a float16 Llama finite in training: a float32 residual stream and dynamic loss scaling.

float16 has 10 mantissa bits (bf16: 7), so the trainer's log-probabilities agree better with an fp16 inference
engine's, but its largest value is 65,504. What overflows first in a Llama is the residual stream: every layer
adds its attention and MLP outputs to it, and the few "massive" channels of a real model grow layer after layer
although each layer's own output stays in range. :func:`keep_residual_fp32` keeps that sum in float32::

    x₀ = float32(embed(tokens))
    h = x_l + float32(attn(fp16(norm(x_l))))         (norm computes in fp32; its output is rounded to fp16)
    x_{l+1} = h + float32(mlp(fp16(norm(h))))
    logits = lm_head(fp16(final_norm(x_L)))

so every matmul still reads and writes fp16 (the weights are the engine's fp16 tensors, shared), and only the
additions and the norms' inputs are float32. Cost: the decoder layers' inputs, which gradient checkpointing
saves, take 4 bytes per value instead of 2.

Gradients are the other end: the loss is divided by the number of tokens in the step, so the 16-bit gradients
flowing back are tiny and can underflow. :class:`DynamicLossScaler` multiplies the loss before backward and
divides the (float32) LoRA gradients after it, halving the scale when a step overflows, as
``torch.amp.GradScaler`` does, but with the skip decision left to the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import transformers_compat
from .recompute import decoder_layers

_HANDLES = "_rlcore_fp32_residual_hooks"


def _hidden_states_to_fp32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if args:
        return (args[0].float(),) + tuple(args[1:]), kwargs
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs, hidden_states=kwargs["hidden_states"].float())
    return args, kwargs


def _output_to(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype)

    return hook


def keep_residual_fp32(model: nn.Module, compute_dtype: torch.dtype = torch.float16) -> int:
    """Makes ``model`` (a Llama-family causal LM, PEFT-wrapped or not) carry its residual stream in float32.

    Each decoder layer receives its hidden states as float32 (a forward pre-hook), so the two residual
    additions inside it run in float32; each RMSNorm, which computes in float32 anyway, returns
    ``compute_dtype`` for the projections after it (a forward hook). Works with rlcore's kernels and with
    gradient checkpointing (the hooks run inside the checkpointed call). Idempotent; returns the number of
    hooks installed (0 if they already were). :func:`release_residual_fp32` removes them.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, _HANDLES, None):
        return 0
    norm_class = transformers_compat.llama_classes()[0]
    layers = decoder_layers(base)
    norms = [module for module in base.modules() if isinstance(module, norm_class)]
    if not norms:
        raise ValueError(f"keep_residual_fp32 found no {norm_class.__name__} in {type(base).__name__}")
    hook = _output_to(compute_dtype)
    handles = [layer.register_forward_pre_hook(_hidden_states_to_fp32, with_kwargs=True) for layer in layers]
    handles += [norm.register_forward_hook(hook) for norm in norms]
    setattr(base, _HANDLES, handles)
    return len(handles)


def release_residual_fp32(model: nn.Module) -> int:
    """Removes the hooks of :func:`keep_residual_fp32`; returns how many."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    handles = getattr(base, _HANDLES, None) or []
    for handle in handles:
        handle.remove()
    if hasattr(base, _HANDLES):
        delattr(base, _HANDLES)
    return len(handles)


def next_loss_scale(scale: float, good_steps: int, finite: bool, growth_factor: float = 2.0,
                    backoff_factor: float = 0.5, growth_interval: int = 2000) -> tuple[float, int]:
    """``(scale, good_steps)`` after one step: an overflow multiplies the scale by ``backoff_factor`` and resets
    the count; ``growth_interval`` finite steps in a row multiply it by ``growth_factor`` (and reset the count).
    The rule of ``torch.amp.GradScaler.update``."""
    if not finite:
        return scale * backoff_factor, 0
    good_steps += 1
    if good_steps >= growth_interval:
        return scale * growth_factor, 0
    return scale, good_steps


@dataclass
class DynamicLossScaler:
    """Loss scaling for 16-bit backward passes into float32 master parameters (the LoRA adapters).

    Per optimizer step: ``scaler.scale_loss(loss).backward()`` for each micro-batch; then
    ``finite = scaler.unscale_(params)`` (gradients divided by the scale, checked for inf/NaN); the caller
    steps the optimizer only if ``finite``; then ``scaler.update(finite)``.
    """

    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    good_steps: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale={self.scale!r} is not allowed: expected a finite number > 0")
        if not self.growth_factor > 1.0:
            raise ValueError(f"growth_factor={self.growth_factor!r} is not allowed: expected a number > 1")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor={self.backoff_factor!r} is not allowed: expected a number in (0, 1)")
        if isinstance(self.growth_interval, bool) or not isinstance(self.growth_interval, int) \
                or self.growth_interval < 1:
            raise ValueError(f"growth_interval={self.growth_interval!r} is not allowed: expected an integer >= 1")

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, parameters: Iterable[torch.nn.Parameter]) -> bool:
        """Divides every gradient by the scale in place; True when all of them are finite (one host sync)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return True
        for grad in grads:
            if grad.dtype in (torch.float16, torch.bfloat16):
                raise ValueError("DynamicLossScaler unscales float32 master gradients; got a "
                                 f"{grad.dtype} gradient (keep the trainable parameters in float32)")
        inverse = 1.0 / self.scale
        for grad in grads:
            grad.mul_(inverse)
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        return bool(finite)

    def update(self, finite: bool) -> None:
        self.scale, self.good_steps = next_loss_scale(self.scale, self.good_steps, finite, self.growth_factor,
                                                      self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
