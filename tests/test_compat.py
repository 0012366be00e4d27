"""The compatibility modules: version checks, the vLLM layout helpers (on stand-in objects), and that no
private vLLM / transformers / torch access lives anywhere else."""

from __future__ import annotations

import ast
import os
import types
import warnings

import numpy as np
import pytest
import torch

from rlcore import vllm_compat
from rlcore.kernels import torch_compat, transformers_compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------- version checks
def test_vllm_version_check():
    vllm_compat.check_version("0.26.0")
    vllm_compat.check_version("0.26.0+cu130")
    with pytest.raises(vllm_compat.VLLMVersionError, match="tested against vllm 0.26.0"):
        vllm_compat.check_version("0.27.1", allow_untested=False)
    with pytest.raises(vllm_compat.VLLMVersionError, match="RLCORE_ALLOW_UNTESTED_VLLM"):
        vllm_compat.check_version("0.25.0", allow_untested=False)
    with pytest.warns(RuntimeWarning, match="0.27.1"):
        vllm_compat.check_version("0.27.1", allow_untested=True)


def test_library_version_checks_warn_outside_the_tested_range():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert transformers_compat.check_version("5.17.0") and transformers_compat.check_version("5.24.1")
        assert torch_compat.check_version("2.11.0+cu130") and torch_compat.check_version("2.13.0")
    with pytest.warns(RuntimeWarning, match="transformers_compat"):
        assert not transformers_compat.check_version("5.30.0")
    with pytest.warns(RuntimeWarning, match="torch_compat"):
        assert not torch_compat.check_version("3.0.0")


# ---------------------------------------------------------------------- vLLM layout helpers
def test_sampled_logprobs_from_flat_and_nested_outputs():
    tokens = [5, 9, 2]
    # position 0: the sampled token is not the first candidate; position 2: it is the only one
    flat = types.SimpleNamespace(start_indices=[0, 2, 3], end_indices=[2, 3, 4], token_ids=[7, 5, 9, 2],
                                 logprobs=[-0.1, -2.0, -0.5, -0.25])
    assert vllm_compat.sampled_logprobs(flat, tokens) == [-2.0, -0.5, -0.25]
    as_arrays = types.SimpleNamespace(start_indices=np.array([0, 2, 3]), end_indices=np.array([2, 3, 4]),
                                      token_ids=np.array([7, 5, 9, 2], dtype=np.int32),
                                      logprobs=np.array([-0.1, -2.0, -0.5, -0.25], dtype=np.float32))
    assert vllm_compat.sampled_logprobs(as_arrays, tokens) == [-2.0, -0.5, -0.25]
    nested = [{7: types.SimpleNamespace(logprob=-0.1), 5: types.SimpleNamespace(logprob=-2.0)},
              {9: types.SimpleNamespace(logprob=-0.5)}, {2: types.SimpleNamespace(logprob=-0.25)}]
    assert vllm_compat.sampled_logprobs(nested, tokens) == [-2.0, -0.5, -0.25]
    with pytest.raises(RuntimeError, match="no logprob for the sampled token 4"):
        vllm_compat.sampled_logprobs(flat, [5, 4, 2])
    with pytest.raises(RuntimeError, match="no logprobs"):
        vllm_compat.sampled_logprobs(None, tokens)


def test_lora_slot_views_write_into_the_slot():
    max_loras, rank, inputs, outputs = 2, 16, 12, 10
    a_slice = torch.zeros(max_loras, 1, rank, inputs)
    b_slice = torch.zeros(max_loras, 1, outputs, rank)
    lora_a, lora_b = torch.randn(8, inputs), torch.randn(outputs, 8)  # policy rank 8 in a rank-16 slot
    target_a, target_b = vllm_compat.lora_slot_views(a_slice, b_slice, 1, lora_a.shape, lora_b.shape)
    target_a.copy_(lora_a)
    target_b.copy_(lora_b * vllm_compat.lora_b_slot_scale(4.0))
    assert torch.equal(a_slice[1, 0, :8], lora_a) and not a_slice[1, 0, 8:].any() and not a_slice[0].any()
    assert torch.equal(b_slice[1, 0, :, :8], lora_b * 4.0) and not b_slice[1, 0, :, 8:].any()
    # the slot (what vLLM computes with) applied to x equals PEFT's scaling · B A x
    x = torch.randn(3, inputs)
    torch.testing.assert_close(x @ a_slice[1, 0].T @ b_slice[1, 0].T, 4.0 * (x @ lora_a.T @ lora_b.T))
    vllm_compat.clear_lora_slot((a_slice,), (b_slice,), 1)
    assert not a_slice.any() and not b_slice.any()
    with pytest.raises(ValueError, match="do not fit"):
        vllm_compat.lora_slot_views(a_slice, b_slice, 0, torch.Size([8, inputs + 1]), lora_b.shape)


def test_weight_names_and_padded_vocabulary():
    assert vllm_compat.unwrapped_parameter_name("model.layers.0.self_attn.qkv_proj.base_layer.weight") == \
        "model.layers.0.self_attn.qkv_proj.weight"
    padded = torch.randn(128, 8)
    real = vllm_compat.unpadded_vocab_rows(padded, torch.Size([100, 8]))
    assert real.shape == (100, 8) and real.data_ptr() == padded.data_ptr()  # a view, no copy
    other = torch.randn(4, 8)
    assert vllm_compat.unpadded_vocab_rows(other, torch.Size([4, 8])) is other


def test_normal_alias_of_inference_tensor_and_parameter_replacement():
    with torch.inference_mode():
        weight = torch.randn(6, 4)
    alias = torch_compat.normal_tensor_alias(weight)
    assert not alias.is_inference() and alias.data_ptr() == weight.data_ptr()
    module = torch.nn.Linear(4, 6, bias=False, device="meta")
    torch_compat.replace_parameter(module, "weight", torch.nn.Parameter(alias, requires_grad=False))
    assert module.weight.data_ptr() == weight.data_ptr() and dict(module.named_parameters())["weight"] is module.weight


# ---------------------------------------------------------------------- one place per library
# Attribute names that are private or undocumented internals of vLLM / transformers / torch.
PRIVATE_ATTRIBUTES = {
    "collective_rpc", "lora_a_stacked", "lora_b_stacked", "lora_manager", "add_dummy_lora", "pin_adapter",
    "_adapter_manager", "lora_index_to_id", "pointer_to_data", "is_asleep", "post_kv_cache_wake_up",
    "start_indices", "end_indices", "packed_modules_mapping", "llm_engine", "model_runner",
    "_attn_implementation", "_gradient_checkpointing_func", "_name_or_path", "_parameters", "_host_emptyCache",
    "set_",
}
COMPAT_MODULES = {"rlcore/vllm_compat.py", "kernels/transformers_compat.py", "kernels/torch_compat.py"}


def _python_files():
    for folder in ("rlcore", "kernels", "rewards", "envs"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                yield f"{folder}/{name}"


def test_private_internals_only_in_compat_modules():
    found = []
    for relative in _python_files():
        if relative in COMPAT_MODULES:
            continue
        with open(os.path.join(ROOT, relative), encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
                found.append(f"{relative}:{node.lineno} .{node.attr}")
            # vLLM's LoRA wrapper naming (PEFT's wrapper has the same name: rlcore/export.py handles PEFT's)
            if (isinstance(node, ast.Constant) and node.value == ".base_layer."
                    and relative != "rlcore/export.py"):
                found.append(f"{relative}:{node.lineno} '.base_layer.'")
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{relative}:{node.lineno} import {n}" for n in names
                      if n.startswith("vllm.device_allocator") or n.startswith("transformers.models.")]
    assert not found, "private library internals outside the compatibility modules:\n" + "\n".join(found)
