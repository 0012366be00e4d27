"""The ``model="tiny"`` preset: a tiny random Llama-3-architecture model with a locally trained Llama-3-style
tokenizer (CPU runs, tests, examples), and a Llama-3-8B-shaped config directory for vLLM's dummy weights.

No weights can be downloaded in CI, yet the whole pipeline (chat template, special tokens, ``eos`` handling,
``AutoModelForCausalLM`` / ``AutoTokenizer`` loading, PEFT, generation) must run against the real code paths.
:func:`build_tiny_model` writes an ordinary Hugging Face model directory that differs from
Meta-Llama-3-8B-Instruct only in size and in having random weights and a small tokenizer::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from rlcore.tiny_model import build_tiny_model

    path = build_tiny_model()                      # cached: built once per machine, ~1-2 s
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

What it shares with Llama-3-Instruct: ``LlamaForCausalLM`` with grouped-query attention, RoPE theta 500000,
untied input/output embeddings, SwiGLU MLP, RMSNorm; a byte-level BPE tokenizer with Llama-3's
pre-tokenisation regex (digits split in groups of up to three), ``<|begin_of_text|>`` prepended by the
post-processor, the special tokens ``<|begin_of_text|>``, ``<|end_of_text|>``, ``<|start_header_id|>``,
``<|end_header_id|>``, ``<|eot_id|>`` (plus reserved ones) placed *after* the regular vocabulary, no pad
token, ``eos_token = "<|eot_id|>"``, Meta's chat template, and a ``generation_config.json`` with
``eos_token_id = [<|end_of_text|>, <|eot_id|>]`` and Meta's sampling defaults (temperature 0.6, top_p 0.9).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

# Bump when anything below changes what is written: the version is part of the cache directory name.
TINY_MODEL_VERSION = 2

TINY_VOCAB_SIZE = 1536  # regular BPE tokens + special tokens, exactly (like Llama-3's 128256)
REGULAR_VOCAB_SIZE = 1520  # what the BPE trainer is asked for; reserved special tokens fill the rest
MAX_POSITION_EMBEDDINGS = 2048
# The output layer is initialised with std initializer_range × 8 (= √(4096 / 64), Llama-3-8B's hidden size over
# ours). Logits are (final RMS-normed hidden state, norm ≈ √hidden) · (a row of lm_head); at hidden 64 with
# std 0.02 they stay within about ±1.5 whatever the layers below do, so no policy can move far from uniform
# and an RL test could never see learning. Scaled, a token's logit can move by ~10, as in a real model.
LM_HEAD_INIT_SCALE = 8.0

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
# Llama-3's order of its first special tokens (ids 128000, 128001, reserved 0-3, 128006, 128007, reserved 4, 128009).
SPECIAL_TOKENS = (BEGIN_OF_TEXT, END_OF_TEXT, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                  "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", START_HEADER, END_HEADER,
                  "<|reserved_special_token_4|>", EOT)

# Llama-3's pre-tokenisation regex (tiktoken cl100k-style): contractions, words with one leading
# non-letter, numbers of 1-3 digits, punctuation runs, newlines, spaces.
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Meta-Llama-3-8B-Instruct's chat template: every message is "<|start_header_id|>{role}<|end_header_id|>\n\n"
# + stripped content + "<|eot_id|>", the first one preceded by bos; add_generation_prompt opens the assistant turn.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def tiny_config_dict(vocab_size: int = TINY_VOCAB_SIZE) -> dict[str, Any]:
    """The ``LlamaConfig`` fields of the tiny model (Llama-3-8B's architecture, scaled down ~30,000×).

    Token ids follow the tokenizer built here: special tokens sit right after the regular vocabulary, in
    :data:`SPECIAL_TOKENS` order.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention, 2 query heads per kv head
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": special_token_id(BEGIN_OF_TEXT),
        "eos_token_id": special_token_id(EOT),  # Llama-3-Instruct's config.json says <|eot_id|> too
        "use_cache": True,
    }


def special_token_id(token: str) -> int:
    """The id of a special token in the tiny tokenizer (they follow the regular vocabulary)."""
    return REGULAR_VOCAB_SIZE + SPECIAL_TOKENS.index(token)


def default_cache_dir() -> str:
    """``$RLCORE_CACHE`` or ``$XDG_CACHE_HOME/rlcore`` or ``~/.cache/rlcore``."""
    if os.environ.get("RLCORE_CACHE"):
        return os.environ["RLCORE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rlcore")


def build_tiny_model(path: str | None = None, seed: int = 0) -> str:
    """Returns the directory of the tiny model for ``seed``, building it first if it is not there.

    Without ``path`` the model lives under :func:`default_cache_dir` as ``tiny-llama3-v{version}[-seed{n}]``.
    The directory is written under a temporary name next to ``path`` and renamed into place, so concurrent
    builders (parallel test processes) never see a half-written model: one rename wins, the others discard
    their copy. The result is a function of ``seed`` only: same bytes on every machine and run.
    """
    if path is None:
        name = f"tiny-llama3-v{TINY_MODEL_VERSION}" + (f"-seed{seed}" if seed else "")
        path = os.path.join(default_cache_dir(), name)
    path = os.path.abspath(path)
    return build_directory_once(path, "config.json", lambda staging: _write_model_dir(staging, seed))


def build_directory_once(path: str, marker: str, write: Callable[[str], None]) -> str:
    """``path``, written by ``write(staging_dir)`` and renamed into place unless ``path/marker`` already exists.

    Nothing half-written is ever at ``path``: a killed build leaves only a staging directory beside it, and
    two processes building at once both end with one complete copy."""
    if os.path.isfile(os.path.join(path, marker)):
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        write(staging)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        try:
            os.rename(staging, path)
        except OSError:
            # Another process renamed its complete copy first (the target exists and is not empty).
            if not os.path.isfile(os.path.join(path, marker)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _write_model_dir(directory: str, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw_tokenizer = train_tiny_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizer, bos_token=BEGIN_OF_TEXT, eos_token=EOT,
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITION_EMBEDDINGS, chat_template=LLAMA3_CHAT_TEMPLATE)
    save_byte_level_tokenizer(tokenizer, directory)
    special_map = os.path.join(directory, "special_tokens_map.json")
    if not os.path.exists(special_map):  # recent transformers folds it into tokenizer_config.json
        with open(special_map, "w", encoding="utf-8") as handle:
            json.dump({"bos_token": BEGIN_OF_TEXT, "eos_token": EOT}, handle, indent=2)
            handle.write("\n")

    config = LlamaConfig(**{k: v for k, v in tiny_config_dict().items() if k not in ("architectures", "model_type")})
    config.architectures = ["LlamaForCausalLM"]
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)  # the weights depend on the seed only
        model = LlamaForCausalLM(config).to(torch.float32)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(LM_HEAD_INIT_SCALE)
    finally:
        torch.random.set_rng_state(generator_state)  # building must not disturb the caller's random stream
    model.generation_config = GenerationConfig(
        bos_token_id=special_token_id(BEGIN_OF_TEXT),
        eos_token_id=[special_token_id(END_OF_TEXT), special_token_id(EOT)],
        do_sample=True, temperature=0.6, top_p=0.9, max_length=MAX_POSITION_EMBEDDINGS)
    from transformers.utils import logging as hf_logging

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a test log is no place for a "Writing model shards" bar
    try:
        model.save_pretrained(directory)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def save_byte_level_tokenizer(tokenizer, directory: str) -> None:
    """``tokenizer.save_pretrained(directory)``, recorded as the generic fast tokenizer class."""
    tokenizer.save_pretrained(directory)
    # save_pretrained writes the class it was given; AutoTokenizer must load this byte-level tokenizer as is
    # (a model-specific class could rebuild the pipeline from the vocabulary), so name the generic class.
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        tokenizer_config = json.load(handle)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(tokenizer_config, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def train_tiny_tokenizer():
    """A byte-level BPE ``tokenizers.Tokenizer`` in Llama-3's layout, trained on :func:`tiny_corpus`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(ignore_merges=True))  # Llama-3's tokenizer.json sets ignore_merges
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=REGULAR_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    regular = tokenizer.get_vocab_size()
    if regular != REGULAR_VOCAB_SIZE:
        # The ids of the special tokens (and the model's vocab_size) are fixed constants; fail loudly if a
        # different corpus or tokenizers version ever learns a different number of merges.
        raise RuntimeError(f"tiny tokenizer learned {regular} regular tokens, expected {REGULAR_VOCAB_SIZE}")
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(5, 5 + TINY_VOCAB_SIZE - regular - len(SPECIAL_TOKENS))]
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS) + reserved)
    bos = special_token_id(BEGIN_OF_TEXT)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BEGIN_OF_TEXT}:0 $A:0",
                                      pair=f"{BEGIN_OF_TEXT}:0 $A:0 {BEGIN_OF_TEXT}:1 $B:1",
                                      special_tokens=[(BEGIN_OF_TEXT, bos)]),
    ])
    assert tokenizer.get_vocab_size() == TINY_VOCAB_SIZE
    return tokenizer


# ----------------------------------------------------------------------------------------------- corpus
_NAMES = ("Natalia", "Weng", "Betty", "Julie", "James", "Mark", "Albert", "Ken", "Alexis", "Tina", "Randy",
          "Joy", "Maria", "John", "Sam", "Lisa", "Tom", "Emma", "Carla", "Pete")
_PRONOUNS = {"Natalia": "she", "Weng": "she", "Betty": "she", "Julie": "she", "James": "he", "Mark": "he",
             "Albert": "he", "Ken": "he", "Alexis": "she", "Tina": "she", "Randy": "he", "Joy": "she",
             "Maria": "she", "John": "he", "Sam": "he", "Lisa": "she", "Tom": "he", "Emma": "she",
             "Carla": "she", "Pete": "he"}
_ITEMS = ("apples", "clips", "pages", "books", "cookies", "marbles", "pencils", "eggs", "cupcakes", "stamps",
          "flowers", "shirts", "tickets", "candies", "bottles", "letters", "cards", "toys", "boxes", "plants")
_PLACES = ("store", "school", "farm", "market", "library", "bakery", "park", "zoo", "garden", "shop")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_ENGLISH = """\
Solve the math problem. Reason step by step, then write the final answer alone on the last line.
The answer is the number of items left after the sale. Each week she saves some money for a new bike.
How many more minutes does he need to finish the race? What is the total cost of the trip, in dollars?
There are twice as many red balls as blue balls in the box, and half as many green ones.
A farmer has chickens, cows and goats; every morning he collects the eggs and sells them at the market.
If a train travels at a constant speed for three hours, how far does it go? Let's think about it.
You are a helpful assistant. Please answer the question carefully and explain your reasoning.
The system prompt tells the assistant what to do; the user asks a question; the assistant answers.
In total, they spent the money on food, rent and books, and the rest went into savings every month.
The percentage of students who passed the test was higher this year than last year, by ten percent.
Therefore, the final answer is written as four hash signs followed by the number, for example #### 42.
Sometimes the answer is put in a box, like \\boxed{42}, or written as: The answer is $1,234.50.
"""


def tiny_corpus(num_problems: int = 2400) -> list[str]:
    """Deterministic training text for the tiny tokenizer: GSM8K-style problems with worked solutions
    (calculator annotations, ``#### N`` lines, dollars, percentages, fractions), chat-turn words and a
    paragraph of plain English. The order and content depend on nothing but ``num_problems``."""
    rng = random.Random(20240501)
    texts = [line for line in _ENGLISH.splitlines() if line] * 20
    for index in range(num_problems):
        name = _NAMES[index % len(_NAMES)]
        pronoun = _PRONOUNS[name]
        item = rng.choice(_ITEMS)
        a, b = rng.randint(2, 120), rng.randint(2, 60)
        kind = index % 6
        if kind == 0:
            question = (f"{name} sold {a} {item} to her friends in {rng.choice(_MONTHS)}, and then {pronoun} "
                        f"sold {b} more. How many {item} did {name} sell altogether?")
            solution = f"{name} sold {a}+{b} = <<{a}+{b}={a + b}>>{a + b} {item} altogether.\n#### {a + b}"
        elif kind == 1:
            rate, minutes = rng.randint(5, 40), rng.choice((30, 45, 50, 60, 90, 120))
            earned = rate * minutes / 60
            earned_text = f"{earned:g}"
            question = (f"{name} earns ${rate} an hour for babysitting. On {rng.choice(_DAYS)}, {pronoun} did "
                        f"{minutes} minutes of babysitting. How much did {pronoun} earn?")
            solution = (f"{name} earns {rate}/60 = $<<{rate}/60={rate / 60:.2f}>>{rate / 60:.2f} per minute.\n"
                        f"Working {minutes} minutes, {pronoun} earned {rate}/60 x {minutes} = "
                        f"$<<{rate}/60*{minutes}={earned_text}>>{earned_text}.\n#### {earned_text}")
        elif kind == 2:
            total = a * b
            question = (f"A {rng.choice(_PLACES)} has {a} boxes with {b} {item} in each box. How many {item} "
                        f"are there in total?")
            solution = f"There are {a} x {b} = <<{a}*{b}={total}>>{total} {item} in total.\n#### {total}"
        elif kind == 3:
            whole = 2 * a
            question = (f"{name} is reading a {whole}-page book. Yesterday, {pronoun} read half of the pages. "
                        f"How many pages are left?")
            solution = (f"{name} read {whole} / 2 = <<{whole}/2={a}>>{a} pages.\nThere are {whole} - {a} = "
                        f"<<{whole}-{a}={a}>>{a} pages left.\n#### {a}")
        elif kind == 4:
            price, percent = rng.randint(10, 500), rng.choice((10, 20, 25, 30, 40, 50))
            discount = price * percent // 100
            question = (f"A shirt costs ${price}. The {rng.choice(_PLACES)} gives a {percent}% discount. What is "
                        f"the price after the discount, in dollars?")
            solution = (f"The discount is {price} x {percent}/100 = $<<{price}*{percent}/100={discount}>>"
                        f"{discount}.\nThe price is {price} - {discount} = $<<{price}-{discount}="
                        f"{price - discount}>>{price - discount}.\nThe answer is {price - discount}.\n"
                        f"#### {price - discount}")
        else:
            big = a * 1000 + b
            question = (f"{name} has {big:,} {item} and gives {b} of them away each day for {a % 7 + 1} days. "
                        f"How many {item} does {pronoun} have now?")
            given = b * (a % 7 + 1)
            solution = (f"{name} gives away {b} x {a % 7 + 1} = <<{b}*{a % 7 + 1}={given}>>{given} {item}.\n"
                        f"{pronoun.capitalize()} has {big} - {given} = <<{big}-{given}={big - given}>>"
                        f"{big - given} {item} now.\nSo the answer is $\\boxed{{{big - given}}}$.\n"
                        f"#### {big - given}")
        texts.append(question)
        texts.append(solution)
        texts.append(f"system\n\n{_ENGLISH.splitlines()[0]}\nuser\n\n{question}\nassistant\n\n{solution}")
    return texts


# Meta-Llama-3-8B's architecture: what the GPU benchmarks and the dummy-weights example run at.
LLAMA3_8B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
    "attention_bias": False, "mlp_bias": False,
}


def write_llama3_8b_dummy_dir(path: str | None = None, layers: int | None = None, with_tokenizer: bool = True) -> str:
    """A model directory with Llama-3-8B's ``config.json`` and no weights, for vLLM's ``load_format="dummy"``.

    With ``with_tokenizer`` the tiny preset's tokenizer files are copied in, so the directory loads through the
    normal paths (``python -m rlcore.run ... --set model=DIR --set load_format=dummy``). The tiny tokenizer's
    ids are a subset of the 128,256-entry vocabulary; generated ids beyond it decode as U+FFFD.
    """
    path = path or tempfile.mkdtemp(prefix="llama3-8b-dummy-")
    os.makedirs(path, exist_ok=True)
    config = dict(LLAMA3_8B_CONFIG)
    if layers:
        config["num_hidden_layers"] = layers
    if with_tokenizer:
        tiny = build_tiny_model()
        for name in os.listdir(tiny):
            if name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(os.path.join(tiny, name), os.path.join(path, name))
        # the tokenizer's special ids, so generation stops on <|eot_id|> as with the real Instruct model
        config["bos_token_id"] = special_token_id(BEGIN_OF_TEXT)
        config["eos_token_id"] = [special_token_id(END_OF_TEXT), special_token_id(EOT)]
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return path
