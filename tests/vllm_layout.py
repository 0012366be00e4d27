"""vLLM's parameter layout for Llama, rebuilt from a transformers model: the fixture of the shared-weight tests."""

from __future__ import annotations

import torch
from torch import nn


def fused_llama_state(reference: nn.Module) -> dict[str, torch.Tensor]:
    """``reference``'s weights named and fused as vLLM's Llama holds them: q/k/v → ``qkv_proj``, gate/up →
    ``gate_up_proj`` (rows concatenated in that order); rotary buffers left out."""
    state = {k: v for k, v in reference.state_dict().items() if "rotary" not in k}
    fused = {}
    for name, value in state.items():
        if any(p in name for p in ("k_proj", "v_proj", "up_proj")):
            continue
        if "q_proj" in name:
            value = torch.cat([value, state[name.replace("q_proj", "k_proj")],
                               state[name.replace("q_proj", "v_proj")]])
            name = name.replace("q_proj", "qkv_proj")
        elif "gate_proj" in name:
            value = torch.cat([value, state[name.replace("gate_proj", "up_proj")]])
            name = name.replace("gate_proj", "gate_up_proj")
        fused[name] = value
    return fused


class NamedTensors(nn.Module):
    """A module whose ``named_parameters`` are exactly ``tensors`` under their dotted vLLM names."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.tensors = tensors
        self.attributes = {name: f"p{i}" for i, name in enumerate(tensors)}
        for name, attribute in self.attributes.items():
            self.register_parameter(attribute, nn.Parameter(tensors[name], requires_grad=False))

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, attribute in self.attributes.items():
            yield name, getattr(self, attribute)
