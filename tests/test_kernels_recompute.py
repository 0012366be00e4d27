"""Selective gradient checkpointing: measured per-layer memory, the plan, and unchanged gradients."""

import pytest
import torch

from rlcore.kernels.recompute import (LayerMemory, decoder_layers, plan_checkpointing, saved_bytes_per_layer,
                                      set_checkpointed_layers)
from tests.test_kernels_model import tiny_llama


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, use_cache=False).logits.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_leaving_layers_out_of_checkpointing_keeps_loss_and_grads():
    model = tiny_llama()
    model.train()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    recomputed: list[int] = []
    # counts MLP forwards, 2 per checkpointed layer (module hooks do not fire during recomputation)
    for index, layer in enumerate(decoder_layers(model)):
        forward = layer.mlp.forward
        layer.mlp.forward = lambda x, i=index, f=forward: (recomputed.append(i), f(x))[1]
    for left_out in (1, 2):
        recomputed.clear()
        assert set_checkpointed_layers(model, left_out) == list(range(2 - left_out, 2))
        loss, grads = _loss_and_grads(model, ids)
        assert sorted(recomputed) == sorted([0, 1] + list(range(2 - left_out)))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="left_out"):
        set_checkpointed_layers(model, 3)


def test_saved_bytes_grow_with_tokens_and_exceed_the_checkpoint():
    model = tiny_llama()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    small = saved_bytes_per_layer(model, torch.randint(0, 300, (2, 16)))
    large = saved_bytes_per_layer(model, torch.randint(0, 300, (2, 64)))
    hidden = 64 * 4  # fp32 hidden size 64
    assert small.checkpointed == 2 * 16 * hidden and large.checkpointed == 2 * 64 * hidden
    # a decoder layer keeps several [tokens × hidden] and [tokens × intermediate] tensors, not just its input
    assert small.full > 4 * small.checkpointed
    assert 3.5 < large.full / small.full < 4.5  # linear in tokens at these sizes (SDPA keeps no [L × L])
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))  # left as it was


def test_plan():
    memory = LayerMemory(full=1000, checkpointed=100)
    assert plan_checkpointing(32, memory, 0) == 0
    assert plan_checkpointing(32, memory, 8999) == 9
    assert plan_checkpointing(32, memory, 1e9) == 32
    with pytest.raises(ValueError):
        plan_checkpointing(32, memory, -1)


def test_needs_checkpointing_enabled():
    with pytest.raises(ValueError, match="not enabled"):
        set_checkpointed_layers(tiny_llama(), 1)


def test_load_policy_leaves_out_what_the_budget_allows():
    from rlcore import GRPOConfig, ModelConfig
    from rlcore.model import load_policy

    model_config = ModelConfig(model_name_or_path="tiny", engine="hf", dtype="float32")
    base_args = dict(per_device_train_batch_size=4, num_generations=4, max_prompt_length=32, max_completion_length=16)
    everything = load_policy(model_config, GRPOConfig(activation_memory_gib=1e3, **base_args)).model
    layers = decoder_layers(everything)
    assert not any(layer.gradient_checkpointing for layer in layers)
    # a budget of 1.5 layers' worth at 4 × 48 tokens leaves exactly one layer out: the last one
    device = next(everything.parameters()).device
    probe = saved_bytes_per_layer(everything, torch.zeros(1, 256, dtype=torch.long, device=device))
    one_and_a_half = 1.5 * probe.saving * (4 * 48 / 256) / 2**30
    model = load_policy(model_config, GRPOConfig(activation_memory_gib=one_and_a_half, **base_args)).model
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [True] * (len(layers) - 1) + [False]
    model = load_policy(model_config, GRPOConfig(activation_memory_gib=0.0, **base_args)).model
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))


def test_measuring_leaks_no_graph():
    import gc

    model = tiny_llama()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def live_elements():
        gc.collect()
        return sum(o.numel() for o in gc.get_objects() if torch.is_tensor(o) and not isinstance(o, torch.nn.Parameter))

    ids = torch.zeros(4, 256, dtype=torch.long)
    saved_bytes_per_layer(model, ids)
    before = live_elements()
    for _ in range(3):
        saved_bytes_per_layer(model, ids)
    assert live_elements() - before < 4 * 256 * 64  # less than one [tokens × hidden] tensor is left behind
