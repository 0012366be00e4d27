"""float16 training stays finite (rlcore.kernels.fp16_stability).

A tiny Llama is built so that its residual stream passes 65,504 (float16's largest value) after its last layer
while every layer's own output stays in range, as the "massive activation" channels of real models grow layer
after layer. Plain float16 then gives NaN log-probabilities; with the float32 residual stream the same float16
weights give finite ones that match a float32 copy of the model, and so do the LoRA gradients (with dynamic
loss scaling). The loss scaler's schedule is checked against ``torch.amp.GradScaler``.
"""

from __future__ import annotations

import pytest
import torch

from rlcore.kernels.fp16_stability import (DynamicLossScaler, keep_residual_fp32, next_loss_scale,
                                           release_residual_fp32)

CHANNEL = 5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _overflowing_llama():
    """fp32 Llama whose channel CHANNEL of the residual stream grows by ~20,500 per layer: 1,000 after the
    embedding, ~83,000 after layer 4 (each MLP: gate = up ≈ 8 from the normalized channel, down adds 128·64·2.5)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.02)
        model.model.embed_tokens.weight[:, CHANNEL] = 1000.0
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[:, CHANNEL] = 1.0
            layer.mlp.up_proj.weight[:, CHANNEL] = 1.0
            layer.mlp.down_proj.weight[CHANNEL, :] = 2.5
        model.lm_head.weight.mul_(20.0)  # peaked next-token distributions, as a trained model's
    return model


def _half_copy(model):
    from transformers import LlamaForCausalLM

    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy.half()


def _logprobs(model, ids):
    logits = model(ids).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


def test_plain_fp16_overflows_and_the_fp32_residual_stream_matches_fp32():
    reference = _overflowing_llama()
    ids = torch.randint(0, 256, (2, 96))
    outputs = []
    hooks = [layer.register_forward_hook(lambda module, args, output: outputs.append(output))
             for layer in reference.model.layers]
    with torch.no_grad():
        expected = _logprobs(reference, ids)
    for hook in hooks:
        hook.remove()
    peaks = [float(output.abs().max()) for output in outputs]
    assert peaks[-2] < 65504 < peaks[-1], peaks  # the residual stream passes fp16's range in the last layer only
    with torch.no_grad():
        half = _half_copy(reference)
        plain = _logprobs(half, ids)
        assert not torch.isfinite(plain).all()  # inf in the residual stream, NaN after the norm
        assert keep_residual_fp32(half) == 4 + 9  # 4 layers; 2 norms each + the final norm
        assert keep_residual_fp32(half) == 0  # idempotent
        ours = _logprobs(half, ids)
    assert torch.isfinite(ours).all()
    assert expected.std() > 1.0  # the comparison below is not between two flat distributions
    assert (ours - expected).abs().max() < 0.05, (ours - expected).abs().max()
    assert release_residual_fp32(half) == 13
    with torch.no_grad():
        assert not torch.isfinite(_logprobs(half, ids)).all()


@pytest.mark.parametrize("kernels", [False, True])
def test_lora_gradients_finite_and_close_to_fp32_with_loss_scaling(kernels):
    from peft import LoraConfig, get_peft_model

    from rlcore.kernels import apply_kernels

    reference = _overflowing_llama()
    half = _half_copy(reference)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    ref_model = get_peft_model(reference, lora)
    model = get_peft_model(half, lora)
    model.load_state_dict(ref_model.state_dict())  # same adapters
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)  # fp32 masters (PEFT's autocast_adapter_dtype)
    keep_residual_fp32(model)
    if kernels:
        apply_kernels(model, lora=True)  # CPU: the kernels' PyTorch references, composed with the hooks
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 256, (2, 64))
    tokens = ids[:, 1:].numel()
    _logprobs(ref_model, ids).sum().div(-tokens * 64).backward()  # a per-token mean over a 64× larger step
    expected = torch.cat([p.grad.flatten() for p in ref_model.parameters() if p.requires_grad])

    scaler = DynamicLossScaler(scale=2.0**32)  # too large at first: these steps overflow and are skipped
    finite = False
    for _ in range(16):
        model.zero_grad(set_to_none=True)
        scaler.scale_loss(_logprobs(model, ids).sum().div(-tokens * 64)).backward()
        finite = scaler.unscale_(trainable)
        scaler.update(finite)
        if finite:
            break
    assert finite and scaler.scale < 2.0**32
    ours = torch.cat([p.grad.flatten() for p in trainable])
    relative = (ours - expected).norm() / expected.norm()
    assert relative < 0.03, relative
    # without scaling, the tiny fp16 gradients lose most of their precision (or underflow)
    model.zero_grad(set_to_none=True)
    _logprobs(model, ids).sum().div(-tokens * 64).backward()
    unscaled = torch.cat([p.grad.flatten() for p in trainable])
    assert (unscaled - expected).norm() / expected.norm() > relative


def test_loss_scale_schedule_matches_torch_grad_scaler():
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([parameter], lr=0.0)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    ours = DynamicLossScaler(scale=1024.0, growth_interval=3)
    pattern = [True, True, False, True, True, True, True, False, False, True, True, True, True]
    for finite in pattern:
        optimizer.zero_grad()
        torch_scaler.scale((parameter * 1.0).sum()).backward()
        if not finite:
            parameter.grad[0] = float("inf")
        torch_scaler.unscale_(optimizer)
        torch_scaler.step(optimizer)
        torch_scaler.update()
        ours.update(finite)
        assert ours.scale == torch_scaler.get_scale(), (finite, ours.scale, torch_scaler.get_scale())
    assert next_loss_scale(8.0, 0, False) == (4.0, 0)
    assert next_loss_scale(8.0, 1, True, growth_interval=2) == (16.0, 0)


def test_unscale_divides_and_detects_overflow():
    a = torch.nn.Parameter(torch.zeros(4))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.full((4,), 8.0)
    b.grad = torch.tensor([4.0, float("nan")])
    scaler = DynamicLossScaler(scale=4.0)
    assert scaler.unscale_([a]) is True and torch.equal(a.grad, torch.full((4,), 2.0))
    assert scaler.unscale_([a, b]) is False
    half = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    half.grad = torch.zeros(2, dtype=torch.float16)
    with pytest.raises(ValueError, match="float32 master"):
        scaler.unscale_([half])
    with pytest.raises(ValueError, match="growth_interval"):
        DynamicLossScaler(growth_interval=0)
    state = scaler.state_dict()
    other = DynamicLossScaler()
    other.load_state_dict(state)
    assert other.scale == scaler.scale and other.good_steps == scaler.good_steps


def test_hf_path_keeps_the_residual_stream_fp32_in_float16(monkeypatch):
    """The transformers-engine path (no vLLM) in float16 gets the same fp32 residual stream as the shared-weight
    path: the decoder layers' hidden states come out float32 while the weights stay float16."""
    from rlcore import model as model_module
    from rlcore.config import ModelConfig
    from rlcore.tiny_model import build_tiny_model

    monkeypatch.setattr(model_module, "compute_dtype", lambda config, device: torch.float16)  # as on a GPU
    config = ModelConfig(model_name_or_path="tiny", dtype="float16", engine="hf")
    model = model_module.load_base_model(build_tiny_model(), config)
    model_module.prepare_for_training(model, config, None)  # as load_policy does after add_lora
    assert next(model.parameters()).dtype == torch.float16
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3, 4]]), output_hidden_states=True)
    assert all(h.dtype == torch.float32 for h in out.hidden_states[1:-1]), [h.dtype for h in out.hidden_states]
    assert torch.isfinite(out.logits).all()


def test_a_float16_module_the_caller_built_gets_the_fp32_residual_stream():
    """``policy_from_module`` (a model built outside rlcore, e.g. in a notebook) sets up float16 as load_policy does:
    fp32 hidden states between the decoder layers, float16 weights, finite logits; a float32 module gets no hooks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlcore.config import ModelConfig
    from rlcore.model import policy_from_module
    from rlcore.tiny_model import build_tiny_model

    path = build_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    for dtype, hidden_dtype in ((torch.float16, torch.float32), (torch.float32, torch.float32)):
        module = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        policy = policy_from_module(module, tokenizer, ModelConfig(model_name_or_path="tiny", engine="hf"))
        base = policy.model.get_base_model()
        assert bool(getattr(base, "_rlcore_fp32_residual_hooks", None)) == (dtype == torch.float16)
        with torch.no_grad():
            out = policy.model(torch.tensor([[1, 2, 3, 4]]), output_hidden_states=True)
        assert all(h.dtype == hidden_dtype for h in out.hidden_states[1:-1]), [h.dtype for h in out.hidden_states]
        assert torch.isfinite(out.logits).all()
