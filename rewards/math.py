"""Rewards for math word problems with a numeric answer (GSM8K and the like).

* :func:`extract_final_answer`: the final number a completion commits to.
* :class:`CorrectAnswer`: that number equals the reference answer (GSM8K's ``answer`` column is the full
  worked solution ending in ``#### N``; N is taken from it).
* :class:`FormatReward`: the completion ends with a final-answer line, ``#### N`` or ``\\boxed{N}``.

Numbers are compared exactly as rationals after normalisation: ``1,234.50`` = ``$1234.5`` = ``1234.50.``
(trailing full stop), ``25%`` = ``25``, ``10 dollars`` = ``10``, ``\\frac{3}{4}`` = ``3/4`` = ``0.75``,
``-7`` = ``−7``.

A number of more than :data:`MAX_ANSWER_DIGITS` digits cannot be read (Python refuses to convert integers of
over 4,300 digits, and nobody's answer is that long): a completion or reference holding one as its answer is
scored wrong, and FormatReward does not count it as a well-formed final line.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from .base import RewardFunction, completion_text

__all__ = ["MAX_ANSWER_DIGITS", "AnswerTooLong", "CorrectAnswer", "FormatReward", "answers_match",
           "extract_final_answer", "extract_reference_answer", "final_answer_line", "parse_number"]

# A number as people write it: optional minus (only where it cannot be a subtraction: nothing word-like
# or closing right before it), optional "$", digits with optional thousands commas, optional decimals,
# optionally "/ denominator".
_NUMBER = re.compile(r"""
    (?P<sign>(?<![\w)\].])[-\u2212])?\s?
    \$?\s?
    (?<![\d,.])(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?!,\d{3})
    (?:\.(?P<frac>\d+))?(?!\d)
    (?:\s?/\s?(?P<den>\d+)(?![\d.]))?
""", re.VERBOSE)
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"\b(?:final\s+)?answer\s*(?:is|:|=)\s*:?([^\n]*)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\s*\{")
_CALCULATOR = re.compile(r"<<[^<>\n]*>>")  # GSM8K's calculator annotations, <<48/2=24>>
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*)\}\s*\{\s*([^{}]*)\}")
MAX_ANSWER_DIGITS = 4000  # below CPython's 4,300-digit int/str conversion limit


class AnswerTooLong(ValueError):
    """A number has more than MAX_ANSWER_DIGITS digits: it is not read as an answer."""


def parse_number(text: str) -> Fraction | None:
    """The first number in ``text`` as an exact fraction, or None.

    >>> parse_number("$1,234.50.")
    Fraction(2469, 2)
    """
    match = _NUMBER.search(_latex_to_plain(text))
    return _to_fraction(match) if match else None


def extract_final_answer(text: str, fallback_last_number: bool = True) -> str | None:
    """The final numeric answer of a solution, canonicalised (``"72"``, ``"1234.5"``, ``"-7"``, ``"1/3"``).

    Looks for, in this order of trust:

    1. explicit answer markers: ``#### N``, ``\\boxed{N}``, ``The (final) answer is N`` / ``Answer: N``; when
       several occur, the one that starts last in the text wins (a marker with no number after it is ignored);
    2. if there is none and ``fallback_last_number``: the last number in the text.

    Returns None when nothing numeric is found. GSM8K's calculator annotations (``<<48/2=24>>``) are ignored.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected the completion text as a str, got {type(text).__name__}")
    text = _latex_to_plain(_CALCULATOR.sub(" ", text))
    best: tuple[int, Fraction] | None = None
    for position, content in _marked_answers(text):
        value = parse_number(content)
        if value is not None and (best is None or position > best[0]):
            best = (position, value)
    if best is not None:
        return _canonical(best[1])
    if fallback_last_number:
        matches = list(_NUMBER.finditer(text))
        if matches:
            return _canonical(_to_fraction(matches[-1]))
    return None


def extract_reference_answer(answer: Any) -> str:
    """The reference number from a dataset's answer field: a GSM8K solution (``... #### 72``), a plain
    number string (``"1,200"``) or an int/float. Raises ValueError when it holds no number (a data problem)."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"reference answer must be a string or a number, got {type(answer).__name__}")
    if isinstance(answer, int) and answer.bit_length() > MAX_ANSWER_DIGITS * 3:  # ~ 0.9 × the digit limit
        raise AnswerTooLong(f"reference answer has more than {MAX_ANSWER_DIGITS * 3 * 0.30103:,.0f} digits")
    if isinstance(answer, (int, float)):
        return _canonical(Fraction(str(answer)))
    if "####" in answer:  # GSM8K: only the text after the last "####" is the answer
        value = parse_number(answer.rsplit("####", 1)[1])
    else:
        found = extract_final_answer(answer)
        value = Fraction(found) if found is not None else None
    if value is None:
        raise ValueError(f"reference answer {answer[-80:]!r} holds no number")
    return _canonical(value)


def answers_match(predicted: str | None, reference: str) -> bool:
    """Exact numeric equality of two answers (strings as :func:`extract_final_answer` returns them, or any
    text :func:`parse_number` reads)."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(reference)
    return a is not None and b is not None and a == b


def final_answer_line(text: str, allow_boxed: bool = True) -> str | None:
    """The number of a well-formed final line, or None. Well-formed means the last non-empty line is

    * ``#### N`` and nothing else (N: a number with optional ``$``, commas, decimals, ``%`` or a final
      full stop), or
    * (``allow_boxed``) a line containing ``\\boxed{N}`` with N a number, e.g. ``The answer is $\\boxed{72}$.``
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    try:
        match = re.fullmatch(r"####\s*(\S.*?)\s*", last)
        if match:
            number = _NUMBER.fullmatch(match.group(1).rstrip(".%").strip())
            return _canonical(_to_fraction(number)) if number else None
        if allow_boxed:
            for position, content in _boxed(last):
                number = _NUMBER.fullmatch(_latex_to_plain(content).strip().rstrip(".%").strip())
                if number:
                    return _canonical(_to_fraction(number))
    except AnswerTooLong:
        return None
    return None


class CorrectAnswer(RewardFunction):
    """``correct`` when the completion's final answer equals the reference number, else ``wrong``.

    The completion's answer is :func:`extract_final_answer` (with the last-number fallback unless
    ``strict=True``, which accepts only ``####``, ``\\boxed{}`` or "the answer is" markers). The reference is
    :func:`extract_reference_answer` of the ``answer_column`` value. A reference with no number raises
    ValueError (reported as a reward failure naming this reward).
    """

    name = "correct_answer"

    def __init__(self, *, correct: float = 1.0, wrong: float = 0.0, strict: bool = False,
                 answer_column: str = "answer", name: str | None = None, weight: float | None = None,
                 penalty: float | None = None) -> None:
        super().__init__(name=name, weight=weight, penalty=penalty)
        self.correct, self.wrong, self.strict = float(correct), float(wrong), strict
        self.answer_column = answer_column
        self.required_columns = {answer_column: (str, int, float)}

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        if self.answer_column not in columns:
            raise KeyError(f"{self.name} needs the dataset column {self.answer_column!r}; got columns "
                           f"{sorted(columns)}")
        references = columns[self.answer_column]
        scores = []
        for completion, reference in zip(completions, references, strict=True):
            try:
                predicted = extract_final_answer(completion_text(completion), fallback_last_number=not self.strict)
                matched = answers_match(predicted, extract_reference_answer(reference))
            except AnswerTooLong:  # an unreadable number is not a right answer
                matched = False
            scores.append(self.correct if matched else self.wrong)
        return scores


class FormatReward(RewardFunction):
    """``good`` when the completion ends with a final-answer line (see :func:`final_answer_line`: the last
    non-empty line is exactly ``#### N``, or contains ``\\boxed{N}`` when ``allow_boxed``), else ``bad``.
    It does not look at whether N is right; pair it with :class:`CorrectAnswer`."""

    name = "format"

    def __init__(self, *, good: float = 1.0, bad: float = 0.0, allow_boxed: bool = True, name: str | None = None,
                 weight: float | None = None, penalty: float | None = None) -> None:
        super().__init__(name=name, weight=weight, penalty=penalty)
        self.good, self.bad, self.allow_boxed = float(good), float(bad), allow_boxed

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        return [self.good if final_answer_line(completion_text(c), self.allow_boxed) is not None else self.bad
                for c in completions]


# ---------------------------------------------------------------------------------------------- helpers
def _marked_answers(text: str) -> list[tuple[int, str]]:
    """(position, text after the marker) for every explicit answer marker."""
    found = [(m.start(), m.group(1)) for m in _HASHES.finditer(text)]
    found += [(m.start(), m.group(1)) for m in _ANSWER_IS.finditer(text)]
    found += _boxed(text)
    return found


def _boxed(text: str) -> list[tuple[int, str]]:
    """(position, content) of every ``\\boxed{...}``, braces balanced (``\\boxed{\\frac{1}{2}}``)."""
    out = []
    for match in _BOXED.finditer(text):
        depth, index = 1, match.end()
        while index < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        if depth == 0:
            out.append((match.start(), text[match.end():index - 1]))
    return out


def _latex_to_plain(text: str) -> str:
    text = _FRAC.sub(r"\1/\2", text)
    return text.replace("{,}", ",").replace("\\,", "").replace("\\!", "").replace("\\$", "$").replace("\\%", "%")


def _to_fraction(match: re.Match) -> Fraction:
    digits = sum(len(match.group(g) or "") for g in ("int", "frac", "den"))
    if digits > MAX_ANSWER_DIGITS:
        raise AnswerTooLong(f"a number of {digits:,} digits (more than {MAX_ANSWER_DIGITS:,})")
    value = Fraction(match.group("int").replace(",", "") + ("." + match.group("frac") if match.group("frac") else ""))
    if match.group("den"):
        denominator = int(match.group("den"))
        value = value / denominator if denominator else value  # "x/0" is not a fraction; keep the numerator
    return -value if match.group("sign") else value


def _canonical(value: Fraction) -> str:
    """``72``, ``1234.5``, ``-7``, ``1/3``: integers and terminating decimals in decimal, others (and decimals
    longer than MAX_ANSWER_DIGITS) as p/q."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    twos = (denominator & -denominator).bit_length() - 1
    denominator >>= twos
    fives = 0
    while denominator % 5 == 0:
        denominator //= 5
        fives += 1
    digits = max(twos, fives)  # a terminating decimal has exactly this many digits after the point
    if denominator != 1 or digits > MAX_ANSWER_DIGITS:
        return f"{value.numerator}/{value.denominator}"
    scaled = abs(value.numerator) * (10 ** digits // value.denominator)  # exact: no float rounding
    whole, decimals = divmod(scaled, 10 ** digits)
    return f"{'-' if value < 0 else ''}{whole}.{decimals:0{digits}d}"
