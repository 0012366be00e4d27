"""Dataset rows: bad rows give an error that names the row and the field."""

import json

import pytest

from rlcore.data import DatasetError, load_rows, prompt_token_ids, validate_rows


def test_load_rows_from_jsonl(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"prompt": "b"}) + "\n")
    assert load_rows(str(path)) == [{"prompt": "a"}, {"prompt": "b"}]
    path.write_text('{"prompt": "a"}\n{broken\n')
    with pytest.raises(DatasetError, match="line 2 is not valid JSON"):
        load_rows(str(path))


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "ok", "answer": "1"}, {"question": "x"}], "row 1: missing field 'prompt'"),
    ([{"prompt": "  "}], "row 0: field 'prompt' is empty"),
    ([{"prompt": []}], "row 0: field 'prompt' is an empty message list"),
    ([{"prompt": [{"role": "user"}]}], "row 0: prompt message 0"),
    ([{"prompt": 5}], "row 0: field 'prompt' must be a string or a list"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": 2}], "row 1: field 'answer' must be str"),
    ([{"prompt": "a"}], "row 0: missing field 'answer'"),
    ([], "is empty"),
])
def test_bad_rows_are_named(rows, message):
    with pytest.raises(DatasetError, match=message):
        validate_rows(rows, {"answer": str})


class FakeTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [0] + [ord(c) for c in text]}


def test_prompt_truncation_keeps_the_end():
    ids, truncated = prompt_token_ids(FakeTokenizer(), "abcdef", max_prompt_length=3)
    assert truncated and ids == [ord("d"), ord("e"), ord("f")]
    ids, truncated = prompt_token_ids(FakeTokenizer(), "ab", max_prompt_length=3)
    assert not truncated and ids == [0, ord("a"), ord("b")]
