"""Grade-school arithmetic word problems in GSM8K's format, and a small Llama-3 model that solves some of them.

No weights can be downloaded where rlcore is tested, yet showing that GRPO *learns* needs a model that already
knows a little. This module makes one from nothing, reproducibly:

1. **The task.** :func:`generate_problems` writes 2-step word problems with small numbers (six kinds: buy and give
   away, boxes sold, pages left, change, a farm, sharing) whose worked solutions are in GSM8K's answer format:
   reasoning lines, then ``#### <number>``. :func:`grpo_rows` turns them into chat prompts with the correct
   solution in an ``answer`` column, which :class:`~rlcore.rewards.CorrectAnswer` reads.
2. **A sloppy tutor.** The supervised data is written by a tutor who, on four of the six kinds, makes the same
   slip in ``TaskSpec.slip_probability`` of the solutions (adds what should be subtracted, forgets the last
   step, adds where it should multiply). Next-token training imitates the tutor faithfully: on those kinds the
   most likely solution is the slipped one, so greedy decoding mostly fails on them, while sampling at
   temperature 1 writes the correct solution about ``1 - slip_probability`` of the time. That is the situation
   a verifiable reward can fix — a correct answer is in reach of sampling and greedy decoding does not take it
   — so held-out greedy accuracy starts near the share of clean kinds (about a third) and GRPO can raise it
   towards 100%.
3. **The model.** :func:`train_tokenizer` trains a byte-level BPE tokenizer on the task's text in Llama-3's
   layout (pre-tokenisation regex, special tokens after the regular vocabulary, Meta's chat template);
   :data:`MODEL_PRESETS` are Llama-3-architecture shapes (grouped-query attention, RoPE theta 500000, untied
   embeddings): ``"tiny"`` (about 0.8M parameters, CPU tests) and ``"small"`` (about 100M, one GPU).
4. **Supervised fine-tuning.** :func:`supervised_finetune` trains every weight with next-token loss on the
   tutor's solutions (prompt tokens masked), with a wall-clock budget.

:func:`build_arithmetic_model` does all of it and writes an ordinary Hugging Face model directory (bf16
safetensors, tokenizer files with the chat template, ``generation_config.json``) that transformers and vLLM
load. Everything is seeded: on CPU the same arguments give the same bytes; on a GPU, kernels that accumulate in
a different order make the result close but not bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rlcore import tiny_model as _llama3  # the tiny preset's module: Llama-3's tokenizer layout, reused as is
from rlcore.dataset_rows import prompt_token_ids

# Bump when anything below changes what a build writes: the version is part of the cache directory name.
ARITHMETIC_MODEL_VERSION = 1

SYSTEM_PROMPT = "Solve step by step. End with the answer as '#### <number>'."

BEGIN_OF_TEXT, END_OF_TEXT, EOT = _llama3.BEGIN_OF_TEXT, _llama3.END_OF_TEXT, _llama3.EOT
START_HEADER, END_HEADER = _llama3.START_HEADER, _llama3.END_HEADER

# ------------------------------------------------------------------------------------------------- the task
_NAMES = {"Natalia": "she", "Weng": "she", "Betty": "she", "Julie": "she", "James": "he", "Mark": "he",
          "Albert": "he", "Ken": "he", "Alexis": "she", "Tina": "she", "Randy": "he", "Joy": "she", "Maria": "she",
          "John": "he", "Sam": "he", "Lisa": "she", "Tom": "he", "Emma": "she", "Carla": "she", "Pete": "he"}
_ITEMS = ("apples", "clips", "books", "cookies", "marbles", "pencils", "eggs", "cupcakes", "stamps", "flowers",
          "shirts", "candies", "bottles", "letters", "cards", "toys", "plants", "stickers", "shells", "coins")
_PLACES = ("store", "school", "market", "library", "bakery", "shop", "club", "toy shop")
_FRIENDS = ("her brother", "his sister", "a friend", "a neighbor", "the teacher", "a classmate")

KINDS = ("buy_give", "boxes_sold", "pages_left", "change", "farm", "share")
SLOPPY_KINDS = ("buy_give", "boxes_sold", "pages_left", "farm")  # the tutor slips on these; "change", "share" clean


@dataclass(frozen=True)
class TaskSpec:
    """How hard the problems are and how sloppy the tutor is.

    ``max_number`` bounds the quantities in a problem, ``max_factor`` the multipliers (boxes, days, tickets,
    friends); results stay below about ``max_number × max_factor + max_number``. ``slip_probability`` is the
    share of supervised solutions of a sloppy kind that carry the tutor's slip.
    """

    max_number: int = 6
    max_factor: int = 3
    slip_probability: float = 0.6
    kinds: tuple[str, ...] = KINDS
    sloppy_kinds: tuple[str, ...] = SLOPPY_KINDS

    def __post_init__(self) -> None:
        for name in ("max_number", "max_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"TaskSpec.{name}={value!r} is not allowed: expected an integer >= 2")
        if isinstance(self.slip_probability, bool) or not isinstance(self.slip_probability, (int, float)) \
                or not 0.0 <= self.slip_probability <= 1.0:
            raise ValueError(f"TaskSpec.slip_probability={self.slip_probability!r} is not allowed: expected a "
                             "number in [0, 1]")
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "sloppy_kinds", tuple(self.sloppy_kinds))
        for name in ("kinds", "sloppy_kinds"):
            unknown = [k for k in getattr(self, name) if k not in KINDS]
            if unknown:
                raise ValueError(f"TaskSpec.{name} has unknown kinds {unknown}; the kinds are {', '.join(KINDS)}")
        if not self.kinds:
            raise ValueError("TaskSpec.kinds is empty: expected at least one of " + ", ".join(KINDS))


@dataclass(frozen=True)
class Problem:
    """One word problem: ``solution`` is the correct worked solution (reasoning lines, then ``#### answer``);
    ``slipped`` is the tutor's slipped solution of it, or None for a kind the tutor gets right."""

    kind: str
    question: str
    solution: str
    answer: int
    slipped: str | None = None


def _solution(lines: Sequence[str], answer: int) -> str:
    return "\n".join([*lines, f"#### {answer}"])


def _make_problem(kind: str, rng: random.Random, spec: TaskSpec) -> Problem:
    """One problem of ``kind`` drawn from ``rng``; each branch states the correct and the slipped reasoning."""
    top, factor = spec.max_number, spec.max_factor
    name = rng.choice(tuple(_NAMES))
    he = _NAMES[name]
    items = rng.choice(_ITEMS)
    if kind == "buy_give":  # a + b - c; slip: adds the c given away
        a, b = rng.randint(2, top), rng.randint(2, top)
        c = rng.randint(1, a + b - 1)
        s = a + b
        question = (f"{name} has {a} {items}. {he.capitalize()} buys {b} more {items} and then gives {c} to "
                    f"{rng.choice(_FRIENDS)}. How many {items} does {name} have now?")
        first = f"After buying: {a} + {b} = {s}."
        return Problem(kind, question, _solution([first, f"After giving {c} away: {s} - {c} = {s - c}."], s - c),
                       s - c, _solution([first, f"After giving {c} away: {s} + {c} = {s + c}."], s + c))
    if kind == "boxes_sold":  # a·b - c; slip: forgets the sale
        a, b = rng.randint(2, factor), rng.randint(2, top)
        t = a * b
        c = rng.randint(1, t - 1)
        question = (f"A {rng.choice(_PLACES)} has {a} boxes with {b} {items} in each box. It sells {c} {items}. "
                    f"How many {items} are left?")
        first = f"In the boxes: {a} x {b} = {t}."
        return Problem(kind, question, _solution([first, f"After selling {c}: {t} - {c} = {t - c}."], t - c),
                       t - c, _solution([first], t))
    if kind == "pages_left":  # c - a·b with c = a·b + d; slip: adds a and b instead of multiplying
        a, b = rng.randint(2, top), rng.randint(2, factor)
        if a == b == 2:  # 2 x 2 = 2 + 2: the slip would give the right answer
            a = rng.randint(3, top)
        t, wrong = a * b, a + b
        c = t + rng.randint(1, top)
        question = (f"{name} reads {a} pages a day for {b} days. The book has {c} pages. How many pages are left "
                    f"to read?")
        return Problem(kind, question,
                       _solution([f"Pages read: {a} x {b} = {t}.", f"Pages left: {c} - {t} = {c - t}."], c - t),
                       c - t,
                       _solution([f"Pages read: {a} + {b} = {wrong}.", f"Pages left: {c} - {wrong} = {c - wrong}."],
                                 c - wrong))
    if kind == "change":  # c - a·b, paid c = a·b + d; the tutor gets it right
        a, b = rng.randint(2, top), rng.randint(2, factor)
        t = a * b
        c = t + rng.randint(1, top)
        question = (f"{name} buys {b} tickets at ${a} each and pays with ${c}. How much change does {he} get, in "
                    f"dollars?")
        return Problem(kind, question,
                       _solution([f"The tickets cost {b} x {a} = {t}.", f"The change is {c} - {t} = {c - t}."],
                                 c - t), c - t)
    if kind == "farm":  # a + a·b; slip: forgets to add the cows
        a, b = rng.randint(2, top), rng.randint(2, factor)
        t = a * b
        question = (f"{name}'s farm has {a} cows and {b} times as many chickens. How many cows and chickens are "
                    f"there on the farm?")
        first = f"Chickens: {a} x {b} = {t}."
        return Problem(kind, question, _solution([first, f"Cows and chickens: {a} + {t} = {a + t}."], a + t),
                       a + t, _solution([first], t))
    if kind == "share":  # a / b + c with a = b·k; the tutor gets it right
        b, k = rng.randint(2, factor), rng.randint(2, top)
        a = b * k
        c = rng.randint(1, top)
        question = (f"{name} shares {a} {items} equally among {b} friends. Then each friend gets {c} more. How many "
                    f"{items} does each friend have?")
        return Problem(kind, question,
                       _solution([f"Each friend first gets {a} / {b} = {k}.", f"Then each has {k} + {c} = {k + c}."],
                                 k + c), k + c)
    raise ValueError(f"unknown problem kind {kind!r}; the kinds are {', '.join(KINDS)}")


def generate_problems(count: int, seed: int, spec: TaskSpec | None = None,
                      exclude: Iterable[str] = ()) -> list[Problem]:
    """``count`` problems, kinds in turn (the same number of each, up to one), numbers drawn from ``seed``.

    Questions in ``exclude`` (e.g. a held-out set's) are skipped, so training never sees an evaluation problem.
    """
    spec = spec or TaskSpec()
    rng = random.Random(seed)
    excluded = set(exclude)
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(f"could not draw {count} problems outside the excluded set with {spec}: the task has "
                             "too few distinct problems; raise max_number / max_factor")
        problem = _make_problem(spec.kinds[len(problems) % len(spec.kinds)], rng, spec)
        if problem.question not in excluded:
            problems.append(problem)
    return problems


def tutor_solution(problem: Problem, rng: random.Random, spec: TaskSpec) -> str:
    """What the tutor writes for ``problem``: the slipped solution with ``spec.slip_probability`` on a sloppy
    kind, else the correct one."""
    if problem.slipped is not None and problem.kind in spec.sloppy_kinds and rng.random() < spec.slip_probability:
        return problem.slipped
    return problem.solution


def chat_prompt(question: str) -> list[dict[str, str]]:
    """The chat messages a problem is asked with (system prompt, then the question)."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def grpo_rows(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """Rows for GRPOTrainer: a chat ``prompt`` and the correct worked solution in ``answer`` (GSM8K's form,
    which :class:`~rlcore.rewards.CorrectAnswer` reads the ``#### N`` of), plus the problem's ``kind``."""
    return [{"prompt": chat_prompt(p.question), "answer": p.solution, "kind": p.kind} for p in problems]


# Seeds of the three disjoint problem streams of one task seed: held-out evaluation, GRPO prompts, SFT.
_EVAL_STREAM, _GRPO_STREAM, _SFT_STREAM = 1, 2, 3


def heldout_problems(count: int, seed: int = 0, spec: TaskSpec | None = None) -> list[Problem]:
    """The held-out evaluation problems of task seed ``seed`` (never used by :func:`supervised_finetune` or
    :func:`grpo_problems` of the same seed)."""
    return generate_problems(count, seed * 10 + _EVAL_STREAM, spec)


def grpo_problems(count: int, seed: int = 0, spec: TaskSpec | None = None,
                  heldout: Sequence[Problem] = ()) -> list[Problem]:
    """GRPO training prompts of task seed ``seed``, none of them among ``heldout``."""
    return generate_problems(count, seed * 10 + _GRPO_STREAM, spec, exclude=[p.question for p in heldout])


# ---------------------------------------------------------------------------------------------- tokenizer
def render_prompt(messages: Sequence[dict[str, str]]) -> str:
    """Meta-Llama-3-Instruct's chat template as a string, with the assistant turn opened (what
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` renders)."""
    turns = "".join(f"{START_HEADER}{m['role']}{END_HEADER}\n\n{m['content'].strip()}{EOT}" for m in messages)
    return f"{BEGIN_OF_TEXT}{turns}{START_HEADER}assistant{END_HEADER}\n\n"


def corpus(spec: TaskSpec, count: int = 6000, seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: questions, correct and slipped solutions, prompts' words."""
    texts = [SYSTEM_PROMPT, "system", "user", "assistant"] * 50
    for problem in generate_problems(count, seed * 10 + _SFT_STREAM, spec):
        texts += [problem.question, problem.solution] + ([problem.slipped] if problem.slipped else [])
    texts += [str(n) for n in range(1000)]  # every number up to 999 is seen, as it would be in real text
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, num_special: int = 32):
    """A byte-level BPE ``tokenizers.Tokenizer`` in Llama-3's layout trained on ``texts``.

    ``vocab_size`` ids in all: the regular tokens the BPE trainer learns (at most ``vocab_size - num_special``),
    then Llama-3's first special tokens (``<|begin_of_text|>``, ``<|end_of_text|>``, reserved, header ids,
    ``<|eot_id|>``), then reserved special tokens up to ``vocab_size``. ``<|begin_of_text|>`` is prepended by the
    post-processor, as in Llama-3.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(_llama3.SPECIAL_TOKENS)
    if num_special < len(specials) or vocab_size <= num_special + 256:
        raise ValueError(f"vocab_size={vocab_size}, num_special={num_special}: need num_special >= "
                         f"{len(specials)} and vocab_size > num_special + 256 (the byte alphabet)")
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))  # Llama-3's tokenizer.json sets ignore_merges
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_llama3.LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - num_special, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    regular = tokenizer.get_vocab_size()
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(5, 5 + vocab_size - regular - len(specials))]
    tokenizer.add_special_tokens(specials + reserved)
    bos = tokenizer.token_to_id(BEGIN_OF_TEXT)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BEGIN_OF_TEXT}:0 $A:0",
                                      pair=f"{BEGIN_OF_TEXT}:0 $A:0 {BEGIN_OF_TEXT}:1 $B:1",
                                      special_tokens=[(BEGIN_OF_TEXT, bos)]),
    ])
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} ids, expected {vocab_size}")
    return tokenizer


def wrap_tokenizer(raw_tokenizer, max_length: int):
    """The transformers tokenizer around a :func:`train_tokenizer` result (bos, eos = ``<|eot_id|>``, no pad
    token, Meta's chat template)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizer, bos_token=BEGIN_OF_TEXT, eos_token=EOT,
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False,
        model_max_length=max_length, chat_template=_llama3.LLAMA3_CHAT_TEMPLATE)


# -------------------------------------------------------------------------------------------------- model
# Llama-3-8B's architecture at smaller sizes (Llama-3-8B: hidden 4096, 32 layers, 32 heads, 8 kv heads, head 128).
MODEL_PRESETS: dict[str, dict[str, int]] = {
    # ~0.8M parameters: seconds of CPU per hundred SFT steps (tests, CI). head_dim 64 (wider than hidden / heads):
    # the smallest head size every vLLM attention backend serves
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 64},
    # ~100M parameters: the GPU model (8 layers of hidden 1024, head_dim 128 and 4 query heads per kv head as
    # in Llama-3-8B)
    "small": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 128},
}
MAX_POSITION_EMBEDDINGS = 2048  # ModelConfig.max_seq_length's default fits


def llama_config(preset: str, tokenizer) -> Any:
    """The ``LlamaConfig`` of ``preset`` for ``tokenizer``'s vocabulary and special ids."""
    from transformers import LlamaConfig

    if preset not in MODEL_PRESETS:
        raise ValueError(f"preset={preset!r} is not allowed: expected one of {', '.join(MODEL_PRESETS)}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITION_EMBEDDINGS, rms_norm_eps=1e-5,
        rope_theta=500000.0, hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        initializer_range=0.02, bos_token_id=tokenizer.convert_tokens_to_ids(BEGIN_OF_TEXT),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOT), use_cache=True, **MODEL_PRESETS[preset])
    config.architectures = ["LlamaForCausalLM"]
    return config


def parameter_count(preset: str, vocab_size: int = 2048) -> int:
    """Parameters of ``preset`` (embeddings and lm_head included)."""
    shape = MODEL_PRESETS[preset]
    hidden, heads, kv_heads, head_dim = (shape["hidden_size"], shape["num_attention_heads"],
                                         shape["num_key_value_heads"], shape["head_dim"])
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * shape["intermediate_size"]
    return shape["num_hidden_layers"] * (attention + mlp + 2 * hidden) + 2 * vocab_size * hidden + hidden


# ---------------------------------------------------------------------------------------------------- SFT
@dataclass
class SFTSettings:
    """Supervised fine-tuning: AdamW, linear warm-up then cosine decay to ``final_lr_ratio``."""

    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3
    final_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    # Wall-clock budget for the optimisation: when the first steps show that ``steps`` would not fit, the
    # schedule is shortened to what fits (then the run depends on the machine's speed).
    max_seconds: float | None = None
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SFTSettings.{name}={value!r} is not allowed: expected an integer >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"SFTSettings.learning_rate={self.learning_rate!r} is not allowed: expected > 0")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"SFTSettings.max_seconds={self.max_seconds!r} is not allowed: expected > 0 or None")


def learning_rate_at(step: int, total: int, peak: float, warmup: int, final_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay:
    ``lr = peak · (r + (1 - r) · (1 + cos(π · p)) / 2)`` with ``p = (step - warmup) / (total - warmup)``,
    ``r = final_ratio``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class _SFTBatches:
    """Tokenised supervised examples (prompt, tutor's solution, ``<|eot_id|>``) drawn from one seeded stream."""

    def __init__(self, tokenizer, spec: TaskSpec, seed: int, exclude: Iterable[str]) -> None:
        self.tokenizer, self.spec = tokenizer, spec
        self.problem_rng = random.Random(seed * 10 + _SFT_STREAM)
        self.tutor_rng = random.Random(seed * 10 + _SFT_STREAM + 100_000)
        self.excluded = set(exclude)
        self.eot = tokenizer.convert_tokens_to_ids(EOT)
        self.drawn = 0
        self.checked = False

    def next(self, size: int) -> tuple[list[list[int]], list[int]]:
        """``size`` examples: token ids and the number of prompt tokens of each."""
        problems: list[Problem] = []
        while len(problems) < size:
            problem = _make_problem(self.spec.kinds[self.drawn % len(self.spec.kinds)], self.problem_rng, self.spec)
            self.drawn += 1
            if problem.question not in self.excluded:
                problems.append(problem)
        prompts = [render_prompt(chat_prompt(p.question)) for p in problems]
        solutions = [tutor_solution(p, self.tutor_rng, self.spec) for p in problems]
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        solution_ids = self.tokenizer(solutions, add_special_tokens=False)["input_ids"]
        if not self.checked:
            # the rendered template must tokenise exactly as the trainer's prompts do
            expected, _ = prompt_token_ids(self.tokenizer, chat_prompt(problems[0].question), None)
            if list(prompt_ids[0]) != list(expected):
                raise RuntimeError("the rendered chat prompt tokenises differently from apply_chat_template")
            self.checked = True
        return ([list(p) + list(s) + [self.eot] for p, s in zip(prompt_ids, solution_ids)],
                [len(p) for p in prompt_ids])


def supervised_finetune(model, tokenizer, spec: TaskSpec, settings: SFTSettings, seed: int = 0,
                        exclude: Iterable[str] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains all of ``model``'s weights in place on the tutor's solutions; returns a summary.

    Loss: mean next-token cross-entropy over the solution and ``<|eot_id|>`` tokens (prompt tokens masked). On
    CUDA the forward runs under bf16 autocast with fp32 master weights.
    """
    import torch

    device = next(model.parameters()).device
    batches = _SFTBatches(tokenizer, spec, seed, exclude)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.learning_rate,
                                  betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if device.type == "cuda" else {}))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    pad = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    model.train()
    total = settings.steps
    losses: list[float] = []
    started = time.perf_counter()
    timed_from, timed_step = None, 0
    step = 0
    while step < total:
        sequences, prompt_lengths = batches.next(settings.batch_size)
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        labels = torch.full((len(sequences), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, prompt_length:len(ids)] = torch.tensor(ids[prompt_length:])
            attention_mask[row, :len(ids)] = 1
        lr = learning_rate_at(step, total, settings.learning_rate, settings.warmup_steps, settings.final_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            loss = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % settings.log_every == 0 or step == total or step == 20:
            losses.append(float(loss.detach()))  # a host sync only when logging
            log(f"sft step {step}/{total}  loss {losses[-1]:.4f}  lr {lr:.2e}  "
                f"{time.perf_counter() - started:.1f} s")
        if settings.max_seconds is not None:
            if step == 10:  # the first steps include one-off costs (allocator, kernels' first launches)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timed_from, timed_step = time.perf_counter(), step
            elif timed_from is not None and step == timed_step + 40 and total > step:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                per_step = (time.perf_counter() - timed_from) / (step - timed_step)
                fits = int((settings.max_seconds - (time.perf_counter() - started)) / per_step) + step
                if fits < total:
                    log(f"sft: {per_step * 1000:.1f} ms/step, {total} steps do not fit in {settings.max_seconds:.0f} s;"
                        f" running {fits}")
                    total = max(step + 1, fits)
            if time.perf_counter() - started > 1.5 * settings.max_seconds:
                log(f"sft: wall-clock budget exceeded at step {step}; stopping")
                break
    model.eval()
    return {"steps": step, "planned_steps": settings.steps, "seconds": time.perf_counter() - started,
            "final_loss": float(loss.detach()), "losses": losses, "examples": step * settings.batch_size}


# ----------------------------------------------------------------------------------------------- evaluation
def greedy_accuracy(model, tokenizer, problems: Sequence[Problem], max_tokens: int = 96,
                    batch_size: int = 256) -> float:
    """Share of ``problems`` whose greedy completion has the correct final answer (``CorrectAnswer``)."""
    scores = _scores(model, tokenizer, problems, max_tokens, batch_size, greedy=True)
    return sum(scores) / len(scores)


def sampled_accuracy(model, tokenizer, problems: Sequence[Problem], samples: int = 8, temperature: float = 1.0,
                     max_tokens: int = 96, batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Mean accuracy of ``samples`` completions per problem at ``temperature`` and pass@``samples`` (the share
    of problems with at least one correct completion)."""
    repeated = [p for p in problems for _ in range(samples)]
    scores = _scores(model, tokenizer, repeated, max_tokens, batch_size, greedy=False, temperature=temperature,
                     seed=seed)
    per_problem = [scores[i * samples:(i + 1) * samples] for i in range(len(problems))]
    return {"mean": sum(scores) / len(scores), f"pass@{samples}": sum(any(s) for s in per_problem) / len(problems)}


def _scores(model, tokenizer, problems: Sequence[Problem], max_tokens: int, batch_size: int, greedy: bool,
            temperature: float = 1.0, seed: int | None = None) -> list[float]:
    from rlcore.hf_engine import HFEngine
    from rlcore.rewards import CorrectAnswer
    from rlcore.rollout import SamplingSettings

    engine = HFEngine(model, tokenizer, max_batch_size=batch_size)
    stop = tuple(tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TEXT, EOT))
    prompts = [prompt_token_ids(tokenizer, chat_prompt(p.question), None)[0] for p in problems]
    rollouts = engine.generate(prompts, SamplingSettings(max_tokens=max_tokens, greedy=greedy,
                                                         temperature=temperature, stop_token_ids=stop, seed=seed))
    return CorrectAnswer()(None, [r.text for r in rollouts], answer=[p.solution for p in problems])


# ------------------------------------------------------------------------------------------------ building
@dataclass
class BuildSettings:
    """Everything a build depends on (the cache key of :func:`build_arithmetic_model`)."""

    preset: str = "small"
    seed: int = 0
    task: TaskSpec = field(default_factory=TaskSpec)
    sft: SFTSettings = field(default_factory=SFTSettings)
    vocab_size: int = 2048
    heldout: int = 256  # held-out problems evaluated after SFT (the GRPO example evaluates the same ones)

    def key(self) -> str:
        """A short hash of the settings (the wall-clock budget excluded: it does not change a finished build's
        meaning when it does not bind)."""
        values = asdict(self)
        values["sft"].pop("max_seconds", None)
        values["sft"].pop("log_every", None)
        text = json.dumps(values, sort_keys=True, default=list)
        return hashlib.sha256(f"{ARITHMETIC_MODEL_VERSION}:{text}".encode()).hexdigest()[:10]


# Small enough for CI on two CPU cores; see tests/test_learning_arithmetic.py for what it reaches.
TINY_BUILD = BuildSettings(preset="tiny",
                           sft=SFTSettings(steps=400, batch_size=32, learning_rate=5e-3, warmup_steps=20),
                           vocab_size=1024)
# ~100M parameters on one GPU: about 30 ms a step on an H200 (estimated), so 1500 steps fit in a minute or so;
# ``SFTSettings.max_seconds`` shortens the schedule on a slower device.
SMALL_BUILD = BuildSettings(sft=SFTSettings(steps=1500, batch_size=64, learning_rate=6e-4, warmup_steps=100))


def default_model_dir(settings: BuildSettings) -> str:
    """Where a build with these settings is cached: ``<rlcore cache>/arithmetic-<preset>-v<version>-<key>``."""
    return os.path.join(_llama3.default_cache_dir(),
                        f"arithmetic-{settings.preset}-v{ARITHMETIC_MODEL_VERSION}-{settings.key()}")


def build_arithmetic_model(path: str | None = None, settings: BuildSettings | None = None, device: str | None = None,
                           log: Callable[[str], None] = print, evaluate: bool = True) -> str:
    """Returns a model directory for ``settings`` (default :data:`SMALL_BUILD`), building it if not there.

    The directory is written under a temporary name and renamed into place, so a crash never leaves a
    half-written model and concurrent builders never see one. ``arithmetic_build.json`` in it records the
    settings, the SFT summary and (with ``evaluate``) held-out greedy accuracy and sampled accuracy / pass@8.
    """
    settings = settings or SMALL_BUILD
    path = os.path.abspath(path or default_model_dir(settings))
    return _llama3.build_directory_once(path, "arithmetic_build.json",
                                        lambda staging: _write_model(staging, settings, device, log, evaluate))


def read_build_report(path: str) -> dict[str, Any]:
    """The ``arithmetic_build.json`` of a built model directory."""
    with open(os.path.join(path, "arithmetic_build.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _write_model(directory: str, settings: BuildSettings, device: str | None, log: Callable[[str], None],
                 evaluate: bool) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    started = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = wrap_tokenizer(train_tokenizer(corpus(settings.task, seed=settings.seed), settings.vocab_size),
                               MAX_POSITION_EMBEDDINGS)
    config = llama_config(settings.preset, tokenizer)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(settings.seed)  # the initial weights depend on the seed only
        model = LlamaForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)  # building must not disturb the caller's random stream
    model.to(device)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"arithmetic model '{settings.preset}': {parameters / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}, "
        f"on {device}; tokenizer in {time.perf_counter() - started:.1f} s")
    heldout = heldout_problems(settings.heldout, settings.seed, settings.task)
    report: dict[str, Any] = {"version": ARITHMETIC_MODEL_VERSION, "settings": asdict(settings),
                              "parameters": parameters, "device": str(device)}
    report["sft"] = supervised_finetune(model, tokenizer, settings.task, settings.sft, settings.seed,
                                        exclude=[p.question for p in heldout], log=log)
    model.to(torch.bfloat16)  # what is saved and what vLLM serves
    if evaluate:
        start = time.perf_counter()
        report["heldout_greedy_accuracy"] = greedy_accuracy(model, tokenizer, heldout)
        report["heldout_sampled"] = sampled_accuracy(model, tokenizer, heldout[:64], samples=8,
                                                     seed=settings.seed)
        report["eval_seconds"] = time.perf_counter() - start
        log(f"held-out ({len(heldout)} problems, bf16): greedy accuracy {report['heldout_greedy_accuracy']:.3f}; "
            f"T=1 sampling: mean {report['heldout_sampled']['mean']:.3f}, pass@8 "
            f"{report['heldout_sampled']['pass@8']:.3f} (first 64)")
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(END_OF_TEXT), tokenizer.convert_tokens_to_ids(EOT)],
        do_sample=True, temperature=0.6, top_p=0.9, max_length=MAX_POSITION_EMBEDDINGS)
    model.config.use_cache = True
    from transformers.utils import logging as hf_logging

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    _llama3.save_byte_level_tokenizer(tokenizer, directory)
    _set_config_dtype(directory, "bfloat16")
    report["build_seconds"] = time.perf_counter() - started
    with open(os.path.join(directory, "arithmetic_build.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, default=list)
        handle.write("\n")


def _set_config_dtype(directory: str, dtype: str) -> None:
    # transformers 5 writes "dtype"; readers written for 4.x (and vLLM's checks) look for "torch_dtype"
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
