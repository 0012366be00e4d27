"""FP8 frozen linear layers (rlcore.kernels.fp8_linear) and their views of vLLM-style FP8 weights (rlcore.fp8_weights).

CPU: the quantizer against an independent round-to-nearest-even over the 254 finite e4m3 values; the autograd
Function (FP8 GEMM through ``torch._scaled_mm`` where this CPU build has it, an emulation otherwise) against a
float64 computation of the same quantized product and against the dequantize → matmul reference; LoRA
gradients; the Triton quantizer in Triton's interpreter (a child process, as the variable must be set before
triton is imported); the shared-weight builder on a model laid out as vLLM 0.26 stores FP8 weights.
GPU (marked gpu): the real kernels at Llama-3-8B shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from rlcore.kernels.fp8_linear import (FP8_DTYPE, FP8_MAX, FP8Linear, _column_major, dequantize_fp8, fp8_linear,
                                       fp8_linear_reference, fp8_matmul_emulated, quantize_fp8,
                                       quantize_fp8_reference)
from rlcore.kernels.lora_linear import lora_linear
from vllm_layout import NamedTensors, fused_llama_state

IN_CHILD = os.environ.get("RLCORE_FP8_INTERPRETER_CHILD") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _e4m3_round(values: torch.Tensor) -> torch.Tensor:
    """Nearest finite e4m3fn value to each of ``values`` (|v| ≤ 448), ties to the even code: by search over the
    table of all codes, not by any conversion routine."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x7F is NaN; 0..0x7E are the non-negative finite values
    table = codes.view(FP8_DTYPE).double()  # increasing with the code
    magnitude = values.double().abs()
    upper = torch.searchsorted(table, magnitude).clamp(max=len(table) - 1)
    lower = (upper - 1).clamp(min=0)
    d_low, d_up = magnitude - table[lower], table[upper] - magnitude
    pick = torch.where(d_up < d_low, upper, lower)
    tie = d_up == d_low
    pick = torch.where(tie & (upper % 2 == 0), upper, pick)
    return torch.where(values < 0, -table[pick], table[pick])


def _fp8_weight(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    scale = w.abs().max() / FP8_MAX
    return (w / scale).to(FP8_DTYPE), scale.reshape(1)


# ---------------------------------------------------------------------- quantization
@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_quantizer_rounds_to_nearest_e4m3_with_the_stated_scale(scaling):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 300, generator=g) * torch.logspace(-3, 2, 37)[:, None]
    x[3] = 0.0  # a padding row
    x[5, :40] *= 1e-6  # e4m3 subnormals
    x = x.to(torch.bfloat16)
    q, scale = quantize_fp8_reference(x, scaling)
    amax = x.float().abs().amax(dim=1, keepdim=True) if scaling == "row" else x.float().abs().amax()
    torch.testing.assert_close(scale, amax.clamp_min(1e-12) / 448, rtol=0, atol=0)
    expected = _e4m3_round((x.float() / scale).clamp(-FP8_MAX, FP8_MAX))  # the quotient in float32, as stated
    assert torch.equal(q.double(), expected)
    assert q.double().abs().max() <= FP8_MAX
    if scaling == "row":
        assert torch.equal(q.double().abs().amax(dim=1)[x.float().abs().amax(1) > 0],
                           torch.full((36,), FP8_MAX, dtype=torch.float64))
    # the dequantized values are within half a step of e4m3 (2^-4 relative for normals)
    error = (dequantize_fp8(q, scale, torch.float64) - x.double()).abs()
    bound = x.double().abs() * 2.0**-4 + scale.double() * 2.0**-10
    assert (error <= bound + 1e-30).all()


def test_quantizer_errors_name_the_argument():
    with pytest.raises(ValueError, match="activation_scaling"):
        quantize_fp8_reference(torch.zeros(2, 16), "column")
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8(torch.zeros(2, 3, 16))


# ---------------------------------------------------------------------- the autograd Function
@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_forward_equals_the_quantized_product_and_tracks_the_reference(scaling):
    weight, scale = _fp8_weight(96, 64)
    x = (torch.randn(3, 7, 64) * 2).to(torch.bfloat16)
    y = fp8_linear(x, weight, scale, activation_scaling=scaling)
    assert y.shape == (3, 7, 96) and y.dtype == torch.bfloat16 and y._base is None
    exact = fp8_matmul_emulated(x.reshape(-1, 64), weight, scale, scaling).view(3, 7, 96)
    # the same quantized operands: only fp32 accumulation order and the bf16 output rounding differ
    torch.testing.assert_close(y.double(), exact, rtol=2**-7, atol=1e-3)
    reference = fp8_linear_reference(x.double(), weight, scale)
    relative = (y.double() - reference).norm() / reference.norm()
    assert relative < 0.05, relative  # activation quantization: a few percent, as at inference
    with pytest.raises(ValueError, match="backend|bfloat16"):
        fp8_linear(x.float(), weight, scale)


@pytest.mark.parametrize("grad_mode", ["fp8", "dequant"])
def test_backward_input_and_lora_gradients(grad_mode):
    weight, scale = _fp8_weight(80, 48, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 48, generator=g).to(torch.bfloat16).requires_grad_()
    lora_a = (torch.randn(4, 48, generator=g) * 0.1).requires_grad_()  # fp32 masters, as PEFT keeps them
    lora_b = (torch.randn(80, 4, generator=g) * 0.1).requires_grad_()
    dy = torch.randn(2, 9, 80, generator=g).to(torch.bfloat16)
    y = fp8_linear(x, weight, scale, None, lora_a, lora_b, 2.0, grad_mode=grad_mode)
    y.backward(dy)
    # float64 reference of the same layer (dequantized weight, exact activations) by autograd
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, lora_a, lora_b))
    w64 = weight.double() * scale.double()
    y64 = x64 @ w64.t() + (x64 @ a64.t()) @ b64.t() * 2.0
    y64.backward(dy.double())
    # LoRA gradients use the exact bf16 x and dy: the same arithmetic as the bf16 LoRA kernel, bf16 rounding only
    xb, ab, bb = (t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b))
    lora_linear(xb, dequantize_fp8(weight, scale, torch.bfloat16), ab, bb, 2.0).backward(dy)
    assert torch.equal(lora_a.grad, ab.grad) and torch.equal(lora_b.grad, bb.grad)
    for ours, exact in ((lora_a.grad, a64.grad), (lora_b.grad, b64.grad)):
        assert (ours.double() - exact).norm() / exact.norm() < 1e-2
    if grad_mode == "dequant":
        assert (x.grad.double() - x64.grad).norm() / x64.grad.norm() < 1e-2
    else:
        # dy quantized per row: equal to the product of the quantized dy, close to the exact one
        dq, dscale = quantize_fp8_reference(dy.reshape(-1, 80), "row")
        lora_part = ((dy.double().reshape(-1, 80) @ b64.detach()) * 2.0) @ a64.detach()
        exact_fp8 = (dq.double() * dscale.double()) @ w64 + lora_part
        torch.testing.assert_close(x.grad.double().reshape(-1, 48), exact_fp8, rtol=2**-7, atol=2e-2)
        relative = (x.grad.double() - x64.grad).norm() / x64.grad.norm()
        assert relative < 0.06, relative


def test_weight_views_need_no_copy_forward_and_give_the_same_result():
    # vLLM's layout: a fused [in, out] view over row-major [out, in] bytes; q/k/v are row slices of its transpose
    fused, scale = _fp8_weight(96, 64, seed=4)
    vllm_weight = fused.t()
    k_rows = vllm_weight.t()[64:80]
    assert k_rows.stride() == (64, 1)
    forward_operand = _column_major(k_rows.t())
    assert forward_operand.data_ptr() == k_rows.data_ptr()  # forward: no copy
    backward_operand = _column_major(k_rows)
    assert backward_operand.data_ptr() != k_rows.data_ptr() and backward_operand.stride() == (1, 16)
    x = torch.randn(5, 64).to(torch.bfloat16).requires_grad_()
    y = fp8_linear(x, k_rows, scale)
    x2 = x.detach().clone().requires_grad_()
    y2 = fp8_linear(x2, k_rows.contiguous(), scale)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_bad_inputs_raise_clear_errors():
    weight, scale = _fp8_weight(32, 16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(x, weight.float(), scale)
    with pytest.raises(ValueError, match="shape mismatch"):
        fp8_linear(torch.randn(3, 17).to(torch.bfloat16), weight, scale)
    with pytest.raises(ValueError, match="per-tensor scale"):
        fp8_linear(x, weight, torch.ones(32))
    with pytest.raises(ValueError, match="grad_mode"):
        fp8_linear(x, weight, scale, grad_mode="int8")
    with pytest.raises(ValueError, match="lora_a and lora_b"):
        fp8_linear(x, weight, scale, lora_a=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="frozen"):
        fp8_linear(x, weight, nn.Parameter(scale.clone()))


def test_module_under_peft_keeps_fp32_adapters_and_fuses_lora_with_the_kernels():
    from peft import LoraConfig, get_peft_model

    from rlcore.kernels import apply_kernels

    weight, scale = _fp8_weight(64, 32, seed=5)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = FP8Linear(weight, scale)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # not cast to the base layer's FP8
    assert layer.base_layer.weight.dtype == FP8_DTYPE and not layer.base_layer.weight.requires_grad
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    peft_out = model(x)
    assert apply_kernels(model, rope=False, swiglu=False, rmsnorm=False, lora=True)["lora"] == 1
    fused_out = model(x)
    torch.testing.assert_close(fused_out.float(), peft_out.float(), rtol=2e-2, atol=2e-2)
    fused_out.float().pow(2).sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- the Triton quantizer in the interpreter
@pytest.mark.skipif(torch.cuda.is_available() or IN_CHILD, reason="on CUDA the GPU tests run the kernel itself")
def test_triton_quantizer_in_interpreter():
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RLCORE_FP8_INTERPRETER_CHILD="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interpreter_body",
                           os.path.abspath(__file__)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout


@pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child of test_triton_quantizer_in_interpreter")
@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_interpreter_body(scaling):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(9, 1100, generator=g) * 3).to(torch.bfloat16)  # 1100: a masked tail after one 1024 block
    x[2] = 0.0
    x[4, :50] *= 1e-5
    q, scale = quantize_fp8(x[:, 7:1077], scaling, backend="triton")  # a strided (non-contiguous rows) view
    q_ref, scale_ref = quantize_fp8_reference(x[:, 7:1077], scaling)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    # and the whole layer with the Triton quantizer, forward and backward
    weight, w_scale = _fp8_weight(48, 32)
    xx = torch.randn(6, 32, generator=g).to(torch.bfloat16).requires_grad_()
    y = fp8_linear(xx, weight, w_scale, activation_scaling=scaling, backend="triton")
    torch.testing.assert_close(y.double(), fp8_matmul_emulated(xx.detach(), weight, w_scale, scaling),
                               rtol=2**-7, atol=1e-3)
    y.sum().backward()
    assert torch.isfinite(xx.grad).all()


# ---------------------------------------------------------------------- shared weights in vLLM's FP8 layout
class _VLLMFP8Llama(NamedTensors):
    """The parameters of vLLM 0.26's Llama after ``quantization="fp8"`` on a 16-bit checkpoint: fused
    ``qkv_proj`` / ``gate_up_proj``; every projection's ``weight`` an [in, out] ``.t()`` view of row-major
    FP8 bytes with one float32 ``weight_scale`` [1] per (fused) layer; embeddings, norms, lm_head 16-bit."""

    def __init__(self, reference: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, value in fused_llama_state(reference).items():
            if name.endswith("_proj.weight"):
                scale = value.abs().max().float() / FP8_MAX
                tensors[name] = (value.float() / scale).to(FP8_DTYPE).t()  # qweight.t()
                tensors[name.replace(".weight", ".weight_scale")] = scale.reshape(1)
            else:
                tensors[name] = value.to(dtype).clone()
        super().__init__(tensors)


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rope_theta=10000.0, tie_word_embeddings=False)


def _dequantized_reference(source: _VLLMFP8Llama, config) -> nn.Module:
    """The same model with every FP8 projection dequantized into an ordinary bf16 transformers Llama."""
    from transformers import LlamaForCausalLM

    from rlcore.fp8_weights import fused_part_rows

    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    state = {}
    for name, value in source.tensors.items():
        if name.endswith("weight_scale"):
            continue
        if value.dtype == FP8_DTYPE:
            value = dequantize_fp8(value.t(), source.tensors[name.replace(".weight", ".weight_scale")],
                                   torch.bfloat16)
            for fused, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))):
                if fused in name:
                    sizes = fused_part_rows(fused, parts, value.shape[0], config)
                    for part, chunk in zip(parts, value.split(list(sizes))):
                        state[name.replace(fused, part)] = chunk
                    break
            else:
                state[name] = value
        else:
            state[name] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def test_shared_fp8_model_is_views_of_the_fp8_tensors_and_computes_the_dequantized_model():
    from transformers import LlamaForCausalLM

    from rlcore.shared_weights import build_shared_model, shared_fraction

    torch.manual_seed(0)
    config = _tiny_config()
    source = _VLLMFP8Llama(LlamaForCausalLM(config).eval())
    model = build_shared_model(source, config, dtype=torch.bfloat16)
    shared, total = shared_fraction(model, source)
    assert shared == total
    layer = model.model.layers[0]
    fp8_modules = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8_modules) == 7 * config.num_hidden_layers
    qkv = source.tensors["model.layers.0.self_attn.qkv_proj.weight"]  # [in, out] view
    q_rows = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    assert layer.self_attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert layer.self_attn.k_proj.weight.data_ptr() == qkv.data_ptr() + q_rows * config.hidden_size  # 1 byte each
    assert layer.self_attn.v_proj.weight_scale.data_ptr() == \
        source.tensors["model.layers.0.self_attn.qkv_proj.weight_scale"].data_ptr()
    assert layer.mlp.down_proj.weight.data_ptr() == source.tensors["model.layers.0.mlp.down_proj.weight"].data_ptr()
    assert layer.mlp.up_proj.weight.shape == (config.intermediate_size, config.hidden_size)
    assert model.lm_head.weight.dtype == torch.bfloat16 and not any(p.requires_grad for p in model.parameters())
    reference = _dequantized_reference(source, config)
    ids = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        ours = torch.log_softmax(model(ids).logits.float(), -1)
        expected = torch.log_softmax(reference(ids).logits.float(), -1)
    # per-token FP8 activations on top of the same FP8 weights: close to the dequantized bf16 model
    assert (ours - expected).abs().mean() < 0.02, (ours - expected).abs().mean()
    # the views are live: changing vLLM's scale changes the trainer's output
    with torch.no_grad():
        source.tensors["model.layers.0.mlp.down_proj.weight_scale"].mul_(3.0)
        changed = torch.log_softmax(model(ids).logits.float(), -1)
    assert (changed - ours).abs().mean() > 0.01


def test_shared_fp8_model_trains_lora_through_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from rlcore.fp8_weights import set_fp8_options
    from rlcore.kernels import apply_kernels
    from rlcore.shared_weights import build_shared_model

    torch.manual_seed(1)
    config = _tiny_config()
    source = _VLLMFP8Llama(LlamaForCausalLM(config).eval())
    model = get_peft_model(build_shared_model(source, config, dtype=torch.bfloat16), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    apply_kernels(model, lora=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    grads = {}
    for mode in ("fp8", "dequant"):
        assert set_fp8_options(model, grad_mode=mode) == 14
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in trainable])
    assert torch.isfinite(grads["fp8"]).all() and grads["dequant"].abs().sum() > 0
    relative = (grads["fp8"] - grads["dequant"]).norm() / grads["dequant"].norm()
    assert relative < 0.1, relative  # FP8 (quantized dy) and exact-dy backward agree to a few percent


def test_fp8_layout_errors_are_clear():
    from transformers import LlamaForCausalLM

    from rlcore.shared_weights import build_shared_model

    config = _tiny_config()
    source = _VLLMFP8Llama(LlamaForCausalLM(config).eval())
    name = "model.layers.1.mlp.down_proj.weight"
    # an FP8 weight not stored as vLLM's transposed view: its orientation can not be trusted
    setattr(source, source.attributes[name], nn.Parameter(source.tensors[name].contiguous(), requires_grad=False))
    with pytest.raises(ValueError, match="down_proj"):
        build_shared_model(source, config, dtype=torch.bfloat16)
    source = _VLLMFP8Llama(LlamaForCausalLM(config).eval())
    del source.attributes["model.layers.0.self_attn.qkv_proj.weight_scale"]
    with pytest.raises(ValueError, match="qkv_proj.*weight_scale"):
        build_shared_model(source, config, dtype=torch.bfloat16)


# ---------------------------------------------------------------------- GPU: the real kernels
@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_gpu_triton_quantizer_matches_reference_bits(scaling):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(777, 14336, device="cuda", generator=g) * 4).to(torch.bfloat16)
    x[5] = 0
    q, scale = quantize_fp8(x, scaling)
    q_ref, scale_ref = quantize_fp8_reference(x, scaling)
    assert torch.equal(scale.reshape(scale_ref.shape), scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_gpu_fp8_linear_llama_shapes_forward_backward(scaling):
    torch.manual_seed(0)
    hidden, q_size, kv = 4096, 4096, 1024
    dense = torch.randn(q_size + 2 * kv, hidden, device="cuda") * 0.02
    w_scale = (dense.abs().max() / FP8_MAX).reshape(1)
    qkv = (dense / w_scale).to(FP8_DTYPE).t()  # vLLM's [in, out] view of row-major [out, in] bytes
    k_rows = qkv.t()[q_size: q_size + kv]
    x = (torch.randn(2, 389, hidden, device="cuda")).to(torch.bfloat16).requires_grad_()
    lora_a = (torch.randn(16, hidden, device="cuda") * 0.01).requires_grad_()
    lora_b = (torch.randn(kv, 16, device="cuda") * 0.01).requires_grad_()
    results = {}
    for mode in ("fp8", "dequant"):
        x.grad = lora_a.grad = lora_b.grad = None
        y = fp8_linear(x, k_rows, w_scale, None, lora_a, lora_b, 2.0, activation_scaling=scaling, grad_mode=mode)
        dy = torch.randn_like(y)
        y.backward(dy)
        results[mode] = (y.detach(), x.grad.clone(), lora_a.grad.clone(), lora_b.grad.clone(), dy)
    y, _, ga, gb, _ = results["fp8"]
    base = fp8_matmul_emulated(x.detach().reshape(-1, hidden), k_rows, w_scale, scaling)
    lora = (x.detach().double().reshape(-1, hidden) @ lora_a.detach().double().t()) @ lora_b.detach().double().t()
    torch.testing.assert_close(y.double().reshape(-1, kv), base + 2.0 * lora, rtol=2**-7, atol=2e-3)
    exact_w = k_rows.double() * w_scale.double()
    for mode, (_, gx_mode, _, _, dy_mode) in results.items():
        exact = dy_mode.double().reshape(-1, kv) @ exact_w + \
            ((dy_mode.double().reshape(-1, kv) @ lora_b.detach().double()) * 2.0) @ lora_a.detach().double()
        relative = (gx_mode.double().reshape(-1, hidden) - exact).norm() / exact.norm()
        assert relative < (0.06 if mode == "fp8" else 0.01), (mode, relative)
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


def test_load_in_fp8_is_another_name_for_dtype_float8():
    from rlcore.config import ModelConfig

    config = ModelConfig(load_in_fp8=True)
    assert config.dtype == "float8" and config.torch_dtype == torch.bfloat16  # activations stay bf16
    assert ModelConfig.from_dict(config.to_dict()).dtype == "float8"
    assert config.replace(dtype="bfloat16").dtype == "bfloat16"  # the alias does not stick to copies
    with pytest.raises(ValueError, match="load_in_fp8"):
        ModelConfig(load_in_fp8=True, dtype="float16")
    with pytest.raises(ValueError, match="load_in_fp8"):
        ModelConfig(load_in_fp8="yes")
