"""Kernels inside a tiny Llama: patching, packed batches, LoRA linear's saved tensors, activation offload."""

import os

import pytest
import torch
from torch import nn

from rlcore.kernels import (apply_kernels, lora_linear, lora_linear_reference, offload_activations, pack_padded,
                            pack_sequences, revert_kernels, selective_log_softmax, unpack, varlen_attention)
from rlcore.kernels.packing import varlen_attention_reference

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, lora: bool = True):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      rope_theta=500000, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    if not lora:
        return model
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; nonzero B makes the LoRA path visible in the outputs
            nn.init.normal_(p, std=0.1)
    return model


def _logits_and_lora_grads(model, ids):
    out = model(input_ids=ids, use_cache=False).logits
    (out.float().pow(2).mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("lora_kernel", [False, True])
def test_apply_kernels_keeps_logits_and_lora_grads(lora_kernel):
    model = tiny_llama()
    model.train()
    ids = torch.randint(0, 300, (2, 9))
    ref_logits, ref_grads = _logits_and_lora_grads(model, ids)
    counts = apply_kernels(model, lora=lora_kernel, backend="torch")
    assert counts["rmsnorm"] == 5 and counts["swiglu"] == 2 and counts["rope"] == 2
    assert counts["lora"] == (14 if lora_kernel else 0)
    logits, grads = _logits_and_lora_grads(model, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    # the reference-model path (adapters disabled) still runs through PEFT's own forward
    with model.disable_adapter():
        base_logits = model(input_ids=ids, use_cache=False).logits
    assert (base_logits - logits).abs().max() > 1e-3
    assert revert_kernels(model) == sum(counts.values())
    torch.testing.assert_close(_logits_and_lora_grads(model, ids)[0], ref_logits, atol=0, rtol=0)


def test_apply_kernels_triton_interpreter_in_model():
    """Same check through the Triton kernels (interpreted on CPU; run in a subprocess so the
    interpreter setting cannot leak into other tests)."""
    if torch.cuda.is_available():
        pytest.skip("covered by the GPU benchmark")
    import subprocess
    import sys

    code = (
        "import torch, tests.test_kernels_model as t\n"
        "from rlcore.kernels import apply_kernels\n"
        "m = t.tiny_llama(); m.train(); ids = torch.randint(0, 300, (2, 9))\n"
        "rl, rg = t._logits_and_lora_grads(m, ids)\n"
        "apply_kernels(m, lora=True, backend='triton')\n"
        "l, g = t._logits_and_lora_grads(m, ids)\n"
        "torch.testing.assert_close(l, rl, atol=1e-5, rtol=1e-5)\n"
        "[torch.testing.assert_close(g[k], rg[k], atol=1e-6, rtol=1e-4) for k in rg]\n"
        "print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def _padded_batch():
    g = torch.Generator().manual_seed(5)
    bsz, length = 3, 11
    ids = torch.randint(0, 300, (bsz, length), generator=g)
    mask = torch.ones(bsz, length, dtype=torch.long)
    mask[0, :3] = 0  # left-padded prompt
    mask[1, 8:] = 0  # right-padded completion
    mask[2, :1] = 0
    mask[2, 9:] = 0
    return ids, mask


def test_packed_logprobs_equal_padded():
    """Per-token log-probs (and their gradients) of a packed batch equal the padded path to 1e-5 (fp32)."""
    model = tiny_llama()
    ids, mask = _padded_batch()
    bsz, length = ids.shape
    head = model.get_base_model().lm_head.weight
    decoder = model.get_base_model().model

    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    targets = ids.roll(-1, dims=1)  # next token; the last column is masked out below
    valid = mask.bool() & mask.roll(-1, dims=1).bool()
    valid[:, -1] = False
    padded = selective_log_softmax(hidden.reshape(-1, 64), head, targets.reshape(-1)).view(bsz, length)
    padded_sum = padded[valid].sum()
    padded_sum.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    packed = pack_padded(ids, mask)
    assert packed.input_ids.shape == (1, int(mask.sum()))
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7] * 3
    assert packed.cu_seqlens.tolist() == [0, 8, 16, 24]
    hidden_p = decoder(**packed.model_kwargs()).last_hidden_state[0]
    logp_p = unpack(hidden_p, packed, (bsz, length))
    lp = selective_log_softmax(logp_p.reshape(-1, 64), head, targets.reshape(-1)).view(bsz, length)
    torch.testing.assert_close(lp[valid], padded[valid].detach(), atol=1e-5, rtol=0)
    lp[valid].sum().backward()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)
    # attention crossing samples would change these: packing without the block mask must differ
    crossing = decoder(input_ids=packed.input_ids, position_ids=torch.arange(24)[None], use_cache=False)
    assert (crossing.last_hidden_state[0, 8:] - hidden_p[8:]).abs().max() > 1e-3


def test_varlen_attention_reference_is_per_sample_sdpa():
    g = torch.Generator().manual_seed(7)
    packed = pack_sequences([torch.arange(5), torch.arange(3), torch.arange(6)])
    total = 14
    q = torch.randn(total, 4, 8, generator=g)
    k = torch.randn(total, 2, 8, generator=g)
    v = torch.randn(total, 2, 8, generator=g)
    out = varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen)
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, packed.cu_seqlens))
    bounds = packed.cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs = q[s:e].transpose(0, 1)
        ks = k[s:e].repeat_interleave(2, 1).transpose(0, 1)
        vs = v[s:e].repeat_interleave(2, 1).transpose(0, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[s:e], ref, atol=1e-6, rtol=1e-5)


def test_pack_errors():
    with pytest.raises(ValueError):
        pack_padded(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError):
        pack_sequences([])


def test_lora_linear_matches_peft_and_saves_nothing_of_tokens_by_out():
    g = torch.Generator().manual_seed(8)
    tokens, d_in, d_out, r = 37, 48, 80, 4
    fused = torch.randn(3 * d_out, d_in, generator=g)
    weight = fused[d_out:2 * d_out]  # a view of another tensor, as with vLLM's fused qkv
    a = (torch.randn(r, d_in, generator=g) * 0.1).requires_grad_()
    b = (torch.randn(d_out, r, generator=g) * 0.1).requires_grad_()
    x = torch.randn(2, tokens, d_in, generator=g, requires_grad=True)
    dy = torch.randn(2, tokens, d_out, generator=g)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear(x, weight, a, b, 2.0)
    y.backward(dy)
    assert saved and all(t.numel() != 2 * tokens * d_out for t in saved)
    assert all(t.shape[-1] != d_out or t.dim() < 2 or t.shape[0] == d_out for t in saved)
    assert any(t.data_ptr() == fused.data_ptr() + d_out * d_in * 4 for t in saved)  # W not copied
    assert weight.grad is None and fused.grad is None
    grads = (x.grad, a.grad, b.grad)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    lora_linear_reference(x64, weight.double(), a64, b64, 2.0).backward(dy.double())
    torch.testing.assert_close(y.double(), lora_linear_reference(x64, weight.double(), a64, b64, 2.0), atol=1e-5,
                               rtol=1e-5)
    for got, ref in zip(grads, (x64.grad, a64.grad, b64.grad)):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, weight.clone().requires_grad_(), a, b, 2.0)


def test_offload_hooks_round_trip_exactly_on_cpu():
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(128, 64, requires_grad=True)
    net(x).pow(2).sum().backward()
    ref = [p.grad.clone() for p in net.parameters()] + [x.grad.clone()]
    net.zero_grad()
    x.grad = None
    hooks = offload_activations(min_bytes=1024, force_cpu_roundtrip=True)
    with hooks:
        loss = net(x).pow(2).sum()
    assert hooks.packed >= 2 and hooks.offloaded_bytes >= 128 * 256 * 4
    loss.backward()
    for got, want in zip([p.grad for p in net.parameters()] + [x.grad], ref):
        assert torch.equal(got, want)
    with offload_activations() as noop:  # default on CPU: nothing moves
        net(x).sum().backward()
    assert noop.packed == 0


def test_lora_linear_fp32_adapters_on_bf16_activations():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(5, 7, 32, generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(24, 32, generator=g) * 0.2).to(torch.bfloat16)
    a = (torch.randn(4, 32, generator=g) * 0.2).requires_grad_()
    b = (torch.randn(24, 4, generator=g) * 0.2).requires_grad_()
    dy = torch.randn(5, 7, 24, generator=g).to(torch.bfloat16)
    y = lora_linear(x, weight, a, b, 2.0)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    ref = lora_linear_reference(x64, weight.double(), a64, b64, 2.0)
    ref.backward(dy.double())
    torch.testing.assert_close(y.double(), ref, atol=3e-2, rtol=2e-2)
    for got, want in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        # sums over 35 bf16 products: bound the error by the gradient's scale, not element-wise
        torch.testing.assert_close(got.double(), want, atol=2e-2 * float(want.abs().max()), rtol=0)


@pytest.mark.gpu
def test_offload_on_gpu_gives_identical_grads_and_less_memory():
    from rlcore.kernels.offload import release_host_cache

    torch.manual_seed(11)
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=512,
                                      rope_theta=500000, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_kernels(model, lora=True)
    model.train()
    ids = torch.randint(0, 512, (4, 1024), device="cuda")

    def run(offload: bool):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        hooks = offload_activations(enabled=offload)
        with hooks:
            hidden = model.get_base_model().model(input_ids=ids, use_cache=False).last_hidden_state
        hidden.float().pow(2).mean().backward()
        torch.cuda.synchronize()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return grads, torch.cuda.max_memory_allocated() - before, hooks

    ref, ref_peak, _ = run(False)
    got, peak, hooks = run(True)
    checkpoints = 8 * 4 * 1024 * 1024 * 2  # each layer's bf16 input
    assert hooks.offloaded_bytes >= checkpoints
    for a, b in zip(got, ref):
        assert torch.equal(a, b)  # the same bytes come back: bit-identical
    assert peak < ref_peak - checkpoints // 2, (peak, ref_peak)
    release_host_cache()
