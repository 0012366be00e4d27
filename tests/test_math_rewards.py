"""GSM8K answer extraction and the CorrectAnswer / FormatReward rewards, on real GSM8K solutions."""

from __future__ import annotations

import json

import pytest

from rlcore.dataset_rows import bundled_gsm8k_path
from rlcore.rewards.base import RewardError
from rlcore.rewards.math import (CorrectAnswer, FormatReward, answers_match, extract_final_answer,
                                 extract_reference_answer, final_answer_line, parse_number)
from rlcore.rewards.scoring import score_completions

# Verbatim "answer" fields of grade-school-math train.jsonl (lines 1, 2, 346, 645, 5716), with their final numbers.
GSM8K = [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in "
     "April and May.\n#### 72", "72"),
    ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
     "$<<0.2*50=10>>10.\n#### 10", "10"),
    ("The amount of money deducted from Adam's daily pay is $40 / 10 = $<<40/10=4>>4.\nSo after deducting 10%, "
     "Adam\u2019s daily pay is $40 \u2013 $4 = $<<40-4=36>>36.\nThis means that in 30 days he earns $36 * 30 = "
     "$<<36*30=1080>>1080.\n#### 1,080", "1080"),
    ("13 weeks have 13 * 7 = <<13*7=91>>91 days.\nFor 91 days the bus system carries 1,200,000 * 91 = "
     "<<1200000*91=109200000>>109,200,000 people.\n#### 109,200,000", "109200000"),
    ("-14 + (-8) + 1 = <<-14+-8+1=-21>>-21 degrees Fahrenheit\n-21/3 = <<-21/3=-7>>-7 degrees Fahrenheit\nThe "
     "average temperature was -7 degrees Fahrenheit.\n#### -7", "-7"),
]


@pytest.mark.parametrize("solution, number", GSM8K)
def test_reference_answer_of_real_gsm8k_solutions(solution, number):
    assert extract_reference_answer(solution) == number
    assert extract_final_answer(solution) == number  # a solution read as a completion gives the same number
    assert final_answer_line(solution) == number


@pytest.mark.parametrize("text, expected", [
    ("so she has 5 apples.\n#### 72", "72"),
    ("#### $1,234.50.", "1234.5"),
    ("#### 72 dollars", "72"),
    ("The total is 3 + 4.\n\\boxed{72}", "72"),
    ("$\\boxed{\\frac{3}{4}}$", "0.75"),
    ("\\boxed{1{,}000}", "1000"),
    ("The answer is $1,234.50", "1234.5"),
    ("Final answer: 25%", "25"),
    ("The answer is 5.\nActually, 4 + 2 = 6", "5"),  # an explicit marker beats a later bare number
    ("#### 7\nThe answer is 8.", "8"),  # of several markers, the last one wins
    ("The answer is below.\n#### 9", "9"),  # a marker without a number does not count
    ("She has 12 - 3 = 9 left.", "9"),  # fallback: the last number; "- 3" is a subtraction, not -3
    ("It dropped to \u22127 degrees", "-7"),
    ("2 + 2 = <<2+2=4>>4 eggs", "4"),
    ("one third: 1/3", "1/3"),
    ("no digits here", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_strict_extraction_needs_a_marker():
    assert extract_final_answer("she has 9 left", fallback_last_number=False) is None
    assert extract_final_answer("she has 9 left\n#### 9", fallback_last_number=False) == "9"


@pytest.mark.parametrize("a, b, same", [
    ("1,234.50", "1234.5", True), ("$72.", "72", True), ("72.00", "72", True), ("0.5", "1/2", True),
    ("-7", "7", False), ("72", "73", False), ("1,080", "1080", True), (None, "1", False),
])
def test_answers_match(a, b, same):
    assert answers_match(a, b) is same


def test_parse_number_is_exact():
    assert parse_number("$0.1") * 3 == parse_number("0.3")  # rationals: no float rounding
    assert parse_number("nothing") is None


def test_correct_answer_scores_strings_and_chat_completions():
    reward = CorrectAnswer()
    solution = GSM8K[0][0]
    completions = [
        "48 / 2 = 24, and 48 + 24 = 72.\n#### 72",
        [{"role": "assistant", "content": "She sold 72 clips in total. The answer is 72."}],
        [{"role": "assistant", "content": "#### 71"}, {"role": "assistant", "content": "Oops, \\boxed{72}"}],
        [{"role": "assistant", "content": "#### 72"}, {"role": "assistant", "content": "No wait: #### 71"}],
        "#### 71",
        "I do not know.",
    ]
    assert reward([None] * 6, completions, answer=[solution] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    scaled = CorrectAnswer(correct=2.0, wrong=-1.0, strict=True)
    assert scaled([None] * 3, ["#### 72", "so it is 72", "#### 5"], answer=[solution] * 3) == [2.0, -1.0, -1.0]
    assert CorrectAnswer()([None] * 2, ["#### 1,080", "#### 1080.0"], answer=["1080", 1080]) == [1.0, 1.0]
    assert CorrectAnswer().required_columns == {"answer": (str, int, float)}


def test_correct_answer_reads_the_configured_column_and_refuses_bad_references():
    reward = CorrectAnswer(answer_column="target")
    assert reward([None], ["#### 3"], target=["#### 3"]) == [1.0]
    with pytest.raises(KeyError, match="target"):
        reward([None], ["#### 3"], answer=["#### 3"])
    with pytest.raises(RewardError, match="correct_answer.*holds no number"):
        score_completions([CorrectAnswer()], [None], ["#### 3"], {"answer": ["#### unknown"]})


@pytest.mark.parametrize("completion, good", [
    ("Reasoning...\n#### 72", True),
    ("Reasoning...\n#### $1,234.50.\n\n", True),
    ("So the answer is $\\boxed{72}$.", True),
    ("#### 72\nLet me double-check that.", False),  # the answer line must be the last line
    ("The answer is 72.", False),
    ("#### seventy-two", False),
    ("#### 72 dollars", False),  # "alone on the last line"
    ("", False),
])
def test_format_reward(completion, good):
    assert FormatReward()([None], [completion]) == [1.0 if good else 0.0]
    assert FormatReward(good=0.5, bad=-0.5)([None], [[{"role": "assistant", "content": completion}]]) == \
        [0.5 if good else -0.5]


def test_format_reward_without_boxed():
    assert FormatReward(allow_boxed=False)([None, None], ["\\boxed{72}", "#### 72"]) == [0.0, 1.0]


def test_bundled_sample_solutions_score_as_correct_and_well_formed():
    with open(bundled_gsm8k_path(), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    assert len(rows) == 200 and rows[0]["answer"] == GSM8K[0][0]
    answers = [row["answer"] for row in rows]
    # every real solution, used as a completion, earns both rewards; its final number shifted by one earns none
    shifted = [a.rsplit("####", 1)[0] + "#### " + str(parse_number(extract_reference_answer(a)) + 1)
               for a in answers]
    scores = score_completions([CorrectAnswer(), FormatReward()], [None] * 400, answers + shifted,
                               {"answer": answers + answers})
    assert scores.values[:200].tolist() == [[1.0, 1.0]] * 200
    assert scores.values[200:, 0].tolist() == [0.0] * 200


HUGE = "9" * 5000  # over CPython's 4,300-digit int/str conversion limit


@pytest.mark.parametrize("completion, answer", [
    (f"#### {HUGE}", "7"),                      # in the completion's answer line
    (f"so it is {HUGE}", "7"),                  # as the completion's last number
    (f"\\boxed{{{HUGE}.5}}", "7"),               # with decimals
    (f"#### 1/{HUGE}", "7"),                    # as a denominator
    ("#### 7", f"#### {HUGE}"),                 # in the reference solution
    ("#### 7", 10 ** 5000 - 1),                 # a huge int reference
    (f"#### {HUGE}", f"#### {HUGE}"),           # both: unreadable is not right
], ids=["answer-line", "last-number", "decimals", "denominator", "reference", "int-reference", "both"])
def test_numbers_over_the_digit_limit_score_wrong_without_raising(completion, answer):
    scores = score_completions([CorrectAnswer(), FormatReward()], [None], [completion], {"answer": [answer]})
    assert scores.values.tolist() == [[0.0, 0.0 if HUGE in completion else 1.0]]


def test_long_but_readable_numbers_still_count():
    long = "1" + "0" * 3000
    assert CorrectAnswer()([None, None], [f"#### {long}", "#### 1"], answer=[f"#### {long}", "#### 1"]) == [1.0, 1.0]
    # 1/2^13000 has 13,000 decimals: kept as p/q, compared exactly, no O(n^2) loop
    assert extract_final_answer("#### 1/" + str(2 ** 13000)) == "1/" + str(2 ** 13000)
    assert extract_final_answer("#### 0.375") == "0.375"
