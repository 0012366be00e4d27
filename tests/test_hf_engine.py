"""HFEngine against independent references: the model's own forward pass, and sampling filters applied by hand."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlcore.hf_engine import HFEngine
from rlcore.rollout import SamplingSettings, SyncStats
from rlcore.tiny_model import build_tiny_model, special_token_id

TOL = 1e-4  # float32, KV-cached incremental decoding vs one full forward pass


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(build_tiny_model())


def _policy():
    """The tiny model with LoRA whose B is non-zero, so the adapters change the outputs."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(build_tiny_model(), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    model.train()
    return model


@pytest.fixture(scope="module")
def policy():
    return _policy()


@pytest.fixture(scope="module")
def engine(policy, tokenizer):
    return HFEngine(policy, tokenizer)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    chats = [[{"role": "user", "content": "Natalia sold 48 clips in April. How many clips did she sell?"}],
             [{"role": "system", "content": "Solve the math problem."}, {"role": "user", "content": "What is 2+3?"}],
             [{"role": "user", "content": "Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes. How much did she earn?"}]]
    out = []
    for chat in chats:
        encoded = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        out.append(list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded))
    assert len({len(p) for p in out}) == 3  # mixed lengths: the batch needs left padding
    return out


def forward_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[len(completion), vocab] logits that predicted each completion token, from one unpadded forward pass."""
    modes = model.training
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    model.train(modes)
    return logits[len(prompt) - 1:len(prompt) - 1 + len(completion)]


def processed_logprobs(logits: torch.Tensor, history: list[int], s: SamplingSettings) -> torch.Tensor:
    """The sampling distribution written out by hand: repetition penalty over the tokens seen so far, then
    temperature, top-k, top-p (smallest most-likely set with mass >= top_p), min-p (>= min_p × max prob)."""
    logits = logits.clone()
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(history)))
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / s.repetition_penalty, values * s.repetition_penalty)
    logits = logits / s.temperature
    keep = torch.ones_like(logits, dtype=torch.bool)
    if s.top_k > 0:
        keep &= logits >= torch.topk(logits, s.top_k).values[-1]
    if s.top_p < 1.0:
        probs = torch.softmax(logits.masked_fill(~keep, -torch.inf), -1)
        order = torch.argsort(probs, descending=True)
        mass_before = torch.cumsum(probs[order], 0) - probs[order]
        kept = torch.zeros_like(keep)
        kept[order[mass_before < s.top_p]] = True
        keep &= kept
    if s.min_p > 0.0:
        probs = torch.softmax(logits.masked_fill(~keep, -torch.inf), -1)
        keep &= probs >= s.min_p * probs.max()
    return torch.log_softmax(logits.masked_fill(~keep, -torch.inf), -1), keep


def test_sampling_logprobs_equal_forward_logprobs(engine, policy, prompts):
    # temperature 1, no filters: the sampling distribution is the model's own softmax (with LoRA active; the
    # checkpoint's generation_config, temperature 0.6 / top_p 0.9, must not leak in).
    rollouts = engine.generate(prompts + prompts, SamplingSettings(max_tokens=12, seed=3))
    assert [r.prompt_ids for r in rollouts] == prompts + prompts
    for r in rollouts:
        assert len(r.completion_ids) == len(r.logprobs) > 0
        expected = torch.log_softmax(forward_logits(policy, r.prompt_ids, r.completion_ids), -1)
        expected = expected.gather(1, torch.tensor(r.completion_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(r.logprobs), expected, rtol=0, atol=TOL)
    # the same prompt twice in one batch gets two independent samples
    assert rollouts[0].completion_ids != rollouts[3].completion_ids


SETTINGS = {
    "temperature": SamplingSettings(max_tokens=8, temperature=0.5, seed=1),
    "top_k": SamplingSettings(max_tokens=8, top_k=40, seed=2),
    "top_p": SamplingSettings(max_tokens=8, top_p=0.3, seed=3),
    "min_p": SamplingSettings(max_tokens=8, min_p=0.95, seed=4),
    "repetition_penalty": SamplingSettings(max_tokens=8, repetition_penalty=3.0, seed=5),
    "all": SamplingSettings(max_tokens=8, temperature=0.3, top_k=400, top_p=0.5, min_p=0.5,
                            repetition_penalty=1.5, seed=6),
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_sampling_logprobs_are_those_of_the_processed_distribution(engine, policy, prompts, case):
    settings = SETTINGS[case]
    filtered_somewhere = changed_somewhere = False
    for r in engine.generate(prompts, settings):
        logits = forward_logits(policy, r.prompt_ids, r.completion_ids)
        for i, token in enumerate(r.completion_ids):
            expected, keep = processed_logprobs(logits[i], r.prompt_ids + r.completion_ids[:i], settings)
            assert keep[token], f"{case}: token {i} was sampled from outside the allowed set"
            assert r.logprobs[i] == pytest.approx(expected[token].item(), abs=TOL), (case, i)
            raw = torch.log_softmax(logits[i], -1)[token].item()
            filtered_somewhere |= bool((~keep).any())
            changed_somewhere |= abs(raw - expected[token].item()) > 10 * TOL
    assert changed_somewhere  # the case really differs from plain sampling, so the check can fail
    if case in ("top_k", "top_p", "min_p", "all"):
        assert filtered_somewhere


@pytest.mark.parametrize("settings", [SamplingSettings(max_tokens=1, seed=0),
                                      SamplingSettings(max_tokens=1, temperature=0.7, top_k=50, top_p=0.9, seed=1)],
                         ids=["plain", "filtered"])
def test_tokens_are_drawn_from_the_reported_distribution(tokenizer, prompts, settings):
    # Reported logprobs could match the reference while the tokens came from another distribution (e.g. the
    # checkpoint's temperature 0.6 / top_p 0.9 applied behind the recorder's back). Draw many first tokens
    # and compare sample statistics with the hand-made distribution; a fixed seed makes this deterministic.
    model = _policy()
    count = 1000
    rollouts = HFEngine(model, tokenizer).generate([prompts[0]] * count, settings)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0, -1].float()
    reference, keep = processed_logprobs(logits, prompts[0], settings)
    probs = reference.exp()
    tokens = torch.tensor([r.completion_ids[0] for r in rollouts])
    assert keep[tokens].all()
    torch.testing.assert_close(torch.tensor([r.logprobs[0] for r in rollouts]), reference[tokens], rtol=0, atol=TOL)
    finite = reference.masked_fill(~keep, 0.0)
    mean = (probs * finite).sum()  # E[log p(token)] under the claimed distribution
    spread = (probs * (finite - mean) ** 2).sum().sqrt() / count ** 0.5
    assert abs(finite[tokens].mean() - mean) < 4 * spread
    top = int(probs.argmax())
    share = (tokens == top).float().mean()
    assert abs(share - probs[top]) < 4 * (probs[top] * (1 - probs[top]) / count).sqrt()


def test_greedy_is_deterministic_argmax_and_batch_invariant(engine, policy, prompts):
    greedy = SamplingSettings(max_tokens=10, greedy=True)
    batch = engine.generate(prompts, greedy)
    assert [r.completion_ids for r in engine.generate(prompts, greedy)] == [r.completion_ids for r in batch]
    for prompt, r in zip(prompts, batch):
        alone = engine.generate([prompt], greedy)[0]  # no padding at all
        assert alone.completion_ids == r.completion_ids
        logits = forward_logits(policy, prompt, r.completion_ids)
        assert r.completion_ids == logits.argmax(-1).tolist()  # argmax of the model's own logits
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(alone.logprobs), rtol=0, atol=TOL)


def test_repetition_penalty_changes_greedy_and_ignores_padding(engine, prompts):
    plain = engine.generate(prompts, SamplingSettings(max_tokens=12, greedy=True))
    penalised = engine.generate(prompts, SamplingSettings(max_tokens=12, greedy=True, repetition_penalty=2.0))
    assert [r.completion_ids for r in plain] != [r.completion_ids for r in penalised]
    for prompt, r in zip(prompts, penalised):
        # the left padding of the batch must not count as "already seen" tokens
        alone = engine.generate([prompt], SamplingSettings(max_tokens=12, greedy=True, repetition_penalty=2.0))
        assert alone[0].completion_ids == r.completion_ids


def test_top_k_1_equals_greedy(engine, prompts):
    greedy = engine.generate(prompts, SamplingSettings(max_tokens=10, greedy=True))
    top1 = engine.generate(prompts, SamplingSettings(max_tokens=10, top_k=1, seed=7))
    assert [r.completion_ids for r in top1] == [r.completion_ids for r in greedy]
    assert all(lp == pytest.approx(0.0, abs=1e-6) for r in top1 for lp in r.logprobs)  # one token kept: p = 1


def test_max_tokens_gives_length_and_stop_token_gives_stop(engine, tokenizer, prompts):
    capped = engine.generate(prompts, SamplingSettings(max_tokens=5, seed=0))
    assert all(len(r.completion_ids) == 5 and r.finish_reason == "length" and r.truncated for r in capped)
    greedy = engine.generate(prompts[:1], SamplingSettings(max_tokens=10, greedy=True))[0].completion_ids
    stop = greedy[3]
    first = greedy.index(stop)
    stopped = engine.generate(prompts[:1], SamplingSettings(max_tokens=10, greedy=True, stop_token_ids=(stop,)))[0]
    assert stopped.completion_ids == greedy[:first + 1]  # the stop token is kept, nothing after it
    assert stopped.finish_reason == "stop" and not stopped.truncated
    assert len(stopped.logprobs) == len(stopped.completion_ids)
    assert stopped.text == tokenizer.decode(greedy[:first + 1], skip_special_tokens=True)


def test_stops_on_eot_by_default_and_hides_it_from_text(tokenizer, prompts):
    # No stop_token_ids given: <|eot_id|> (tokenizer eos / generation_config) must end the completion.
    # Point the eot row of the output layer along the greedy token of step 2, so eot wins from there on.
    model = _policy()
    eot = special_token_id("<|eot_id|>")
    engine = HFEngine(model, tokenizer)
    greedy = engine.generate(prompts[:1], SamplingSettings(max_tokens=10, greedy=True))[0].completion_ids
    with torch.no_grad():
        head = model.get_base_model().get_output_embeddings().weight
        head[eot] = 3.0 * head[greedy[2]]
    r = engine.generate(prompts[:1], SamplingSettings(max_tokens=10, greedy=True))[0]
    assert r.finish_reason == "stop" and r.completion_ids[-1] == eot and len(r.completion_ids) <= 3
    assert r.completion_ids[:-1] == greedy[:len(r.completion_ids) - 1]
    assert r.text == tokenizer.decode(r.completion_ids[:-1]) and "<|eot_id|>" not in r.text
    assert len(r.logprobs) == len(r.completion_ids)


def test_seed_reproducible_and_private(engine, prompts):
    settings = SamplingSettings(max_tokens=8, seed=11)
    state = torch.random.get_rng_state()
    a = engine.generate(prompts, settings)
    assert torch.equal(state, torch.random.get_rng_state())  # a seeded call leaves the global stream alone
    b = engine.generate(prompts, settings)
    c = engine.generate(prompts, SamplingSettings(max_tokens=8, seed=12))
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]


def test_generation_runs_in_eval_mode_without_grad_with_kv_cache(engine, policy, prompts):
    seen: list[tuple[bool, bool, int]] = []
    embed = policy.get_base_model().get_input_embeddings()
    hook = embed.register_forward_hook(
        lambda module, args, output: seen.append((module.training, torch.is_grad_enabled(), args[0].shape[1])))
    dropout_modes = {name: m.training for name, m in policy.named_modules()}
    try:
        engine.generate(prompts, SamplingSettings(max_tokens=6, seed=0))
    finally:
        hook.remove()
    assert len(seen) == 6 and not any(training or grad for training, grad, _ in seen)
    assert seen[0][2] == max(len(p) for p in prompts)  # the prompt once, then one new token per step
    assert [width for _, _, width in seen[1:]] == [1] * 5
    assert {name: m.training for name, m in policy.named_modules()} == dropout_modes  # train mode restored
    assert policy.training
    assert all(p.grad is None for p in policy.parameters())


def test_bad_input_is_refused(engine, prompts):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([prompts[0], []], SamplingSettings(max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate(prompts, SamplingSettings(max_tokens=0))
    assert engine.generate([], SamplingSettings(max_tokens=4)) == []
    assert engine.sync_weights() == SyncStats()
