"""padding_free: the decoder runs on one packed row of real tokens and gives the padded path's numbers."""

import pytest
import torch
from torch import nn

from rlcore import GRPOConfig, ModelConfig
from rlcore.kernels import apply_kernels, packing
from rlcore.logprobs import completion_logprobs
from rlcore.reporting import read_metrics
from rlcore.rewards import RewardFunction

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

PROMPT_LENGTHS = [14, 2, 7, 1]  # very different prompt and completion lengths, one completion empty
COMPLETION_LENGTHS = [25, 3, 11, 0]


def lora_policy(device: str = "cpu", dtype: torch.dtype = torch.float32, checkpointing: bool = False):
    """The tiny Llama-3 model with LoRA on every projection; B nonzero so the adapters change the outputs."""
    from rlcore.model import add_lora, enable_gradient_checkpointing
    from rlcore.tiny_model import build_tiny_model

    base = transformers.AutoModelForCausalLM.from_pretrained(build_tiny_model(), dtype=dtype,
                                                             attn_implementation="sdpa").to(device)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    torch.manual_seed(0)
    model = add_lora(base, ModelConfig(lora_dropout=0.0))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.1)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return model


def ragged_batch(vocab_size: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """left-padded prompt ‖ right-padded completion, as ``trimmed_inputs`` builds it."""
    g = torch.Generator().manual_seed(7)
    prompt_width, completion_width = max(PROMPT_LENGTHS), max(COMPLETION_LENGTHS)
    ids = torch.randint(0, vocab_size, (len(PROMPT_LENGTHS), prompt_width + completion_width), generator=g)
    mask = torch.zeros_like(ids)
    for row, (p, c) in enumerate(zip(PROMPT_LENGTHS, COMPLETION_LENGTHS)):
        mask[row, prompt_width - p:prompt_width + c] = 1
    ids[mask == 0] = 0  # pad id: must never reach the packed row
    return ids.to(device), mask.to(device), completion_width


def logprobs_entropy_grads(model, ids, mask, width, packed: bool, temperature: float = 0.7):
    model.zero_grad(set_to_none=True)
    logps, entropy = completion_logprobs(model, ids, mask, width, temperature, chunk_size=16, return_entropy=True,
                                         packed=packed)
    real = mask[:, -width:].bool()
    # a loss that reaches every real position through both outputs
    weights = torch.linspace(-1.0, 1.0, real.numel(), device=ids.device).view_as(real)
    ((logps.float() * weights * real).sum() + 0.3 * (entropy.float() * real).sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), entropy.detach(), grads


def assert_grads_close(got: dict, want: dict, rtol: float) -> float:
    assert got.keys() == want.keys() and len(want) > 0
    worst = 0.0
    for name, reference in want.items():
        error = float((got[name] - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
        worst = max(worst, error)
        assert error <= rtol, f"{name}: relative error {error:.2e}"
    return worst


def test_packed_row_has_only_real_tokens():
    model = lora_policy()
    ids, mask, width = ragged_batch(model.config.vocab_size)
    seen = []
    decoder = model.get_base_model().get_decoder()
    handle = decoder.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            completion_logprobs(model, ids, mask, width, packed=True)
    finally:
        handle.remove()
    (kwargs,) = seen
    real = [p + c for p, c in zip(PROMPT_LENGTHS, COMPLETION_LENGTHS)]
    assert kwargs["input_ids"].shape == (1, sum(real)) == (1, int(mask.sum()))
    assert kwargs["input_ids"][0].tolist() == ids[mask.bool()].tolist()  # every real token, in order, no pad
    assert kwargs["position_ids"][0].tolist() == [i for n in real for i in range(n)]  # restarting per sample
    assert kwargs["attention_mask"] is None and kwargs["use_cache"] is False
    assert kwargs["cu_seq_lens_q"].tolist() == [0, *torch.tensor(real).cumsum(0).tolist()]


@pytest.mark.parametrize("kernels,checkpointing", [(False, False), (True, True)])
def test_packed_logprobs_entropy_and_lora_grads_equal_padded(kernels, checkpointing):
    model = lora_policy(checkpointing=checkpointing)
    if kernels:  # the patched attention takes cu_seq_lens_q (its reference varlen path on CPU), no HF mask
        apply_kernels(model, lora=True, backend="torch")
    ids, mask, width = ragged_batch(model.config.vocab_size)
    padded = logprobs_entropy_grads(model, ids, mask, width, packed=False)
    packed = logprobs_entropy_grads(model, ids, mask, width, packed=True)
    real = mask[:, -width:].bool()
    assert packed[0].shape == padded[0].shape == (len(PROMPT_LENGTHS), width)
    torch.testing.assert_close(packed[0][real], padded[0][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[1][real], padded[1][real], atol=1e-5, rtol=0)
    assert packed[0][~real].eq(0).all() and packed[1][~real].eq(0).all()
    assert_grads_close(packed[2], padded[2], rtol=1e-5)


@pytest.mark.parametrize("kernels", [False, True])
def test_no_dense_mask_when_rlcore_attention_reads_cu_seqlens(monkeypatch, kernels):
    """With rlcore's attention everywhere, transformers builds no [T, T] mask for the packed row (it would be
    4 GiB at 64k tokens); without it, HF's block-diagonal mask is what keeps samples apart."""
    from transformers.models.llama import modeling_llama

    model = lora_policy(checkpointing=True)
    if kernels:
        apply_kernels(model, lora=True, backend="torch")
    masks, varlen_calls = [], []
    create = modeling_llama.create_causal_mask
    monkeypatch.setattr(modeling_llama, "create_causal_mask", lambda **kw: masks.append(create(**kw)) or masks[-1])
    varlen = packing.varlen_attention
    monkeypatch.setattr(packing, "varlen_attention", lambda *a, **kw: varlen_calls.append(1) or varlen(*a, **kw))
    ids, mask, width = ragged_batch(model.config.vocab_size)
    padded = logprobs_entropy_grads(model, ids, mask, width, packed=False)
    masks.clear()
    packed = logprobs_entropy_grads(model, ids, mask, width, packed=True)
    real = mask[:, -width:].bool()
    torch.testing.assert_close(packed[0][real], padded[0][real], atol=1e-5, rtol=0)
    assert_grads_close(packed[2], padded[2], rtol=1e-5)
    total = int(mask.sum())
    if kernels:
        assert masks == [None]
        # every layer in the forward and again in the checkpointed recomputation
        assert len(varlen_calls) == 2 * model.config.num_hidden_layers
        assert model.config._attn_implementation == "sdpa"  # switched for the forward only
    else:
        assert len(masks) == 1 and masks[0] is not None and masks[0].shape[-2:] == (total, total)
        assert not varlen_calls


@pytest.mark.parametrize("broken", ["positions_do_not_restart", "attention_crosses_samples"])
def test_packed_logprobs_differ_when_packing_is_broken(monkeypatch, broken):
    """The comparison above can fail: each way of getting packing wrong moves the numbers far past 1e-5."""
    model = lora_policy()
    ids, mask, width = ragged_batch(model.config.vocab_size)
    padded = logprobs_entropy_grads(model, ids, mask, width, packed=False)
    original = packing.PackedBatch.model_kwargs

    def model_kwargs(self, flash=False):
        kwargs = original(self, flash)
        total = kwargs["input_ids"].shape[1]
        if broken == "positions_do_not_restart":  # one long sequence: also no sample boundary for the mask
            kwargs["position_ids"] = torch.arange(total)[None]
        else:  # right positions, plain causal mask over the whole row
            kwargs["attention_mask"] = torch.ones(total, total, dtype=torch.bool).tril()[None, None]
        return kwargs

    monkeypatch.setattr(packing.PackedBatch, "model_kwargs", model_kwargs)
    packed = logprobs_entropy_grads(model, ids, mask, width, packed=True)
    real = mask[:, -width:].bool()
    assert (packed[0][real] - padded[0][real]).abs().max() > 1e-3
    with pytest.raises(AssertionError):
        assert_grads_close(packed[2], padded[2], rtol=1e-5)


def test_padding_free_needs_a_prompt_token():
    model = lora_policy()
    ids, mask, width = ragged_batch(model.config.vocab_size)
    mask[1, :-width] = 0  # row 1 loses its prompt
    with pytest.raises(ValueError, match="padding_free"):
        completion_logprobs(model, ids, mask, width, packed=True)


class DigitShare(RewardFunction):
    def __call__(self, prompts, completions, **columns):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


ROWS = [{"prompt": f"Write the number {n} and more numbers{'!' * (n % 5) * 3}:"} for n in range(32)]
# (not mismatch_*: engine vs trainer log-probs differ by ~1e-7 there, rounding noise on both sides)
DETERMINISTIC = ("loss", "grad_norm", "kl", "entropy", "reward_mean", "completion_length_mean")


def ragged_engine(model, tokenizer):
    """The HF engine with each completion cut to a fixed, different length (some empty): the random tiny model
    would otherwise always run to max_completion_length. Cutting keeps a prefix, so its sampling log-probs
    stay right."""
    from rlcore.hf_engine import HFEngine
    from rlcore.rollout import Rollout

    class Ragged(HFEngine):
        def generate(self, prompt_ids, sampling):
            out = []
            for i, r in enumerate(super().generate(prompt_ids, sampling)):
                keep = (5 * i + 3) % (sampling.max_tokens + 2)
                if keep >= len(r.completion_ids):
                    out.append(r)
                    continue
                ids = r.completion_ids[:keep]
                out.append(Rollout(r.prompt_ids, ids, tokenizer.decode(ids), r.logprobs[:keep], "stop", r.extras))
            return out

    return Ragged(model, tokenizer)


def run_trainer(tmp_path, name: str, **overrides) -> list[dict]:
    from rlcore.model import add_lora, load_tokenizer
    from rlcore.tiny_model import build_tiny_model
    from rlcore.trainer import GRPOTrainer

    values = dict(output_dir=str(tmp_path / name), num_generations=4, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, max_completion_length=12, max_prompt_length=64,
                  learning_rate=1e-3, max_steps=3, save_steps=100, seed=3, logging_steps=1,
                  gradient_checkpointing=False, beta=0.04, num_iterations=2, top_entropy_quantile=0.8,
                  report_to=[])
    values.update(overrides)
    path = build_tiny_model()
    tokenizer = load_tokenizer(path)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    torch.manual_seed(values["seed"])
    model = add_lora(base, ModelConfig())
    trainer = GRPOTrainer(model, processing_class=tokenizer, reward_funcs=[DigitShare()],
                          args=GRPOConfig(**values), train_dataset=ROWS, engine=ragged_engine(model, tokenizer),
                          show_progress=False)
    return read_metrics(trainer.train()["metrics_file"])


def test_trainer_padding_free_matches_padded(tmp_path):
    """Old-policy, reference (adapter disabled) and training log-probs all take the packed path; prompts and
    completions have different lengths."""
    padded = run_trainer(tmp_path, "padded")
    packed = run_trainer(tmp_path, "packed", padding_free=True)
    assert len(packed) == len(padded) == 3
    assert padded[0]["completion_length_min"] == 0 and padded[0]["completion_length_max"] == 12
    for want, got in zip(padded, packed):
        for key in DETERMINISTIC:
            assert key in want, key
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (want["step"], key)
        assert want["grad_norm"] > 0


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
def test_gpu_varlen_attention_matches_reference():
    """torch's varlen_attn (or flash-attn) against SDPA under the block mask, in bf16 with GQA, with grads."""
    from rlcore.kernels.packing import (torch_varlen_attn, varlen_attention, varlen_attention_reference,
                                        varlen_backend)

    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [37, 1, 130, 64]
    packed = packing.pack_sequences([torch.zeros(n, dtype=torch.long, device="cuda") for n in lengths])
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for heads in (8, 2, 2))
    if torch_varlen_attn is not None:
        assert varlen_backend(q, 64 ** -0.5) == "torch_varlen"
    out = varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen, scale=64 ** -0.5)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = varlen_attention_reference(q32, k32, v32, packed.cu_seqlens, scale=64 ** -0.5)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q32, k32, v32))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, atol=1e-1, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_packed_logprobs_with_kernels_equal_padded(monkeypatch, dtype):
    """With rlcore's kernels on CUDA the packed forward goes through the varlen branch of the patched attention
    and gives the padded path's log-probs, entropies and LoRA gradients."""
    calls = []
    original = packing.varlen_attention

    def counting(q, *args, **kwargs):
        calls.append(packing.varlen_backend(q, kwargs.get("scale"), kwargs.get("backend")))
        return original(q, *args, **kwargs)

    monkeypatch.setattr(packing, "varlen_attention", counting)
    model = lora_policy("cuda", dtype, checkpointing=True)
    apply_kernels(model, lora=True)
    ids, mask, width = ragged_batch(model.config.vocab_size, "cuda")
    real = mask[:, -width:].bool()
    padded = logprobs_entropy_grads(model, ids, mask, width, packed=False)
    assert not calls
    packed = logprobs_entropy_grads(model, ids, mask, width, packed=True)
    assert len(calls) >= model.config.num_hidden_layers  # forward (+ recompute under checkpointing)
    if dtype == torch.float32:
        assert set(calls) == {"reference"}
        torch.testing.assert_close(packed[0][real], padded[0][real], atol=1e-4, rtol=0)
        torch.testing.assert_close(packed[1][real], padded[1][real], atol=1e-4, rtol=0)
        assert_grads_close(packed[2], padded[2], rtol=1e-3)
        return
    if packing.torch_varlen_attn is not None:
        assert set(calls) == {"torch_varlen"}
    # bf16: both paths round; each must be as close to the fp32 numbers as the other
    exact = lora_policy("cuda", torch.float32, checkpointing=True)
    exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    reference = logprobs_entropy_grads(exact, ids, mask, width, packed=False)
    for i in (0, 1):
        err_packed = (packed[i][real].float() - reference[i][real]).abs().max()
        err_padded = (padded[i][real].float() - reference[i][real]).abs().max()
        assert err_packed <= 2 * err_padded + 2e-2, (i, float(err_packed), float(err_padded))
    for name, want in reference[2].items():
        scale = want.abs().max()
        err_packed = (packed[2][name].float() - want).abs().max() / scale
        err_padded = (padded[2][name].float() - want).abs().max() / scale
        assert err_packed <= 2 * err_padded + 2e-2, (name, float(err_packed), float(err_padded))


@pytest.mark.gpu
def test_gpu_trainer_padding_free_matches_padded(tmp_path):
    """The whole step on CUDA (bf16, kernels applied by load_policy): packed and padded runs agree."""
    from rlcore.trainer import GRPOTrainer

    def first_step(name: str, padding_free: bool) -> dict:
        config = GRPOConfig(output_dir=str(tmp_path / name), num_generations=4, per_device_train_batch_size=8,
                            gradient_accumulation_steps=2, max_completion_length=32, max_prompt_length=64,
                            max_steps=1, save_steps=100, seed=3, beta=0.04, padding_free=padding_free,
                            report_to=[])
        trainer = GRPOTrainer(ModelConfig(model_name_or_path="tiny", engine="hf"), reward_funcs=[DigitShare()],
                              args=config, train_dataset=ROWS, show_progress=False)
        return read_metrics(trainer.train()["metrics_file"])[0]

    padded, packed = first_step("padded", False), first_step("packed", True)
    for key in ("loss", "grad_norm"):
        assert packed[key] == pytest.approx(padded[key], rel=5e-2, abs=1e-3), key
