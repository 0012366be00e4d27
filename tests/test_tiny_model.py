"""The tiny Llama-3 preset: a real HF model directory, Llama-3's tokenizer layout and chat template, reproducible."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlcore.tiny_model import build_tiny_model, special_token_id, tiny_config_dict

BOS, EOT, END = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
# A real GSM8K solution (train.jsonl line 2): digits, "$", calculator annotations, newlines.
GSM8K_ANSWER = ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
                "$<<0.2*50=10>>10.\n#### 10")


@pytest.fixture(scope="module")
def path() -> str:
    return build_tiny_model()


@pytest.fixture(scope="module")
def tokenizer(path):
    return AutoTokenizer.from_pretrained(path)


def _digest(directory: str, names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in names:
        with open(os.path.join(directory, name), "rb") as handle:
            out[name] = hashlib.sha256(handle.read()).hexdigest()
    return out


def test_directory_is_a_llama3_shaped_hf_model(path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(path, name)), name
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama"
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)  # grouped-query attention
    rope_theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    assert rope_theta == 500000.0
    assert config.tie_word_embeddings is False
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.data_ptr() != head.data_ptr() and not torch.equal(embed, head)  # untied, as in Llama-3-8B
    assert config.vocab_size == tiny_config_dict()["vocab_size"]
    assert 250_000 < sum(p.numel() for p in model.parameters()) < 400_000


def test_tokenizer_has_llama3_special_tokens_and_no_pad(tokenizer):
    assert len(tokenizer) == AutoConfig.from_pretrained(tokenizer.name_or_path).vocab_size
    for token in (BOS, END, "<|start_header_id|>", "<|end_header_id|>", EOT):
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert ids == [special_token_id(token)], token  # one id each, after the regular vocabulary
    assert tokenizer.bos_token == BOS and tokenizer.eos_token == EOT
    assert tokenizer.pad_token is None  # like Llama-3: callers choose a pad id
    ids = tokenizer(GSM8K_ANSWER)["input_ids"]
    assert ids[0] == special_token_id(BOS) and ids.count(special_token_id(BOS)) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == GSM8K_ANSWER  # byte-level: lossless
    assert tokenizer.decode(tokenizer("café 😀 ½")["input_ids"], skip_special_tokens=True) == "café 😀 ½"
    # Llama-3's pre-tokeniser splits digit runs into groups of at most three.
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("1234567", add_special_tokens=False))
    assert "".join(pieces) == "1234567" and max(len(p) for p in pieces) <= 3
    assert len(ids) < len(GSM8K_ANSWER) / 2  # the BPE learned merges on math text


def test_chat_template_renders_meta_llama3_format(tokenizer):
    messages = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": " What is 2+3? \n"}]
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSolve it.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without == expected[:-len("<|start_header_id|>assistant<|end_header_id|>\n\n")]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    assert list(ids) == tokenizer.encode(expected, add_special_tokens=False)  # no second bos


def test_generation_config_stops_on_eot_like_llama3_instruct(path):
    generation = GenerationConfig.from_pretrained(path)
    assert sorted(generation.eos_token_id) == sorted([special_token_id(END), special_token_id(EOT)])
    with open(os.path.join(path, "config.json")) as handle:
        assert json.load(handle)["eos_token_id"] == special_token_id(EOT)
    # Make <|eot_id|> the likeliest token wherever the greedy pick has a positive logit: generate must stop there.
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = torch.tensor([tokenizer("Natalia sold 48 clips in April.")["input_ids"]])
    with torch.no_grad():
        first = model(prompt).logits[0, -1].argmax()
        head = model.get_output_embeddings().weight
        head[special_token_id(EOT)] = 2.0 * head[first]
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                             pad_token_id=special_token_id(EOT))
    assert out[0, -1].item() == special_token_id(EOT) and out.shape[1] == prompt.shape[1] + 1


def test_build_is_reproducible_across_processes(path, tmp_path):
    # A fresh interpreter (other hash seed, tokenizers threads on) must write the same bytes as this one did.
    target = str(tmp_path / "tiny")
    code = f"from rlcore.tiny_model import build_tiny_model; print(build_tiny_model({target!r}))"
    env = {**os.environ, "PYTHONHASHSEED": "123", "TOKENIZERS_PARALLELISM": "true"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == target
    assert sorted(os.listdir(tmp_path)) == ["tiny"]  # renamed into place: no staging directory left over
    files = ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json")
    assert _digest(target, files) == _digest(path, files)


def test_seed_changes_weights_not_tokenizer(path, tmp_path):
    other = build_tiny_model(str(tmp_path / "seed1"), seed=1)
    a, b = _digest(path, ("model.safetensors", "tokenizer.json")), _digest(other, ("model.safetensors", "tokenizer.json"))
    assert a["tokenizer.json"] == b["tokenizer.json"]
    assert a["model.safetensors"] != b["model.safetensors"]
    state = torch.random.get_rng_state()
    build_tiny_model(str(tmp_path / "seed2"), seed=2)
    assert torch.equal(state, torch.random.get_rng_state())  # building leaves the caller's RNG alone


def test_losing_a_build_race_returns_the_winners_copy(tmp_path, monkeypatch):
    import shutil

    import rlcore.tiny_model as tiny_model

    target = tmp_path / "tiny"
    original = tiny_model._write_model_dir

    def write_then_lose(directory: str, seed: int) -> None:
        original(directory, seed)
        shutil.copytree(directory, target)  # another process renames its complete copy into place first
        (target / "winner").write_text("1")

    monkeypatch.setattr(tiny_model, "_write_model_dir", write_then_lose)
    assert build_tiny_model(str(target)) == str(target)
    assert (target / "winner").exists()  # the winner's directory was kept, not replaced
    assert sorted(os.listdir(tmp_path)) == ["tiny"]  # the loser's staging copy was removed
