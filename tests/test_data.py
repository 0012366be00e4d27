"""Dataset rows: bad rows give an error that names the row and the field."""

import json

import pytest

from rlcore.dataset_rows import DatasetError, load_rows, prompt_token_ids, validate_rows


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


@pytest.mark.parametrize("row, message", [
    ({"prompt": "What is 2\ud800 + 2?"}, r"row 1: field 'prompt' holds text that is not valid Unicode: '\\ud800'"),
    ({"prompt": [{"role": "user", "content": "hi \udfff"}]}, r"row 1: field 'prompt'\[0\]\['content'\] holds text"),
    ({"prompt": "ok", "answer": "4\udc80"}, r"row 1: field 'answer' holds text that is not valid Unicode"),
    ({"prompt": "ok", "meta": {"tags": ["a", "\ud83d"]}}, r"row 1: field 'meta'\['tags'\]\[1\] holds text"),
])
def test_unencodable_text_is_rejected_with_row_and_field(row, message):
    rows = [{"prompt": "fine", "answer": "1"}, {"answer": "1", **row}]
    with pytest.raises(DatasetError, match=message):
        validate_rows(rows, {"answer": str})


def test_lone_surrogate_escape_in_jsonl_is_caught_at_validation(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b \\ud800 c"}\n', encoding="utf-8")  # a JSON escape
    rows = load_rows(str(path))
    with pytest.raises(DatasetError, match="row 1: field 'prompt' holds text that is not valid Unicode"):
        validate_rows(rows)


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(DatasetError, match=rf"{path} line 2 is not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_rows(str(path))
    json_path = tmp_path / "rows.json"
    json_path.write_bytes(b'[{"prompt": "a"},\n {"prompt": "\xff"}]')
    with pytest.raises(DatasetError, match=rf"{json_path} line 2 is not UTF-8 text"):
        load_rows(str(json_path))
    json_path.write_bytes(b'[{"prompt": "a"},\n {"prompt": "b"]')
    with pytest.raises(DatasetError, match=rf"{json_path} is not valid JSON: .*line 2"):
        load_rows(str(json_path))


def test_utf8_with_byte_order_mark_loads(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "\u00e9t\u00e9"}\n'.encode())
    assert load_rows(str(path)) == [{"prompt": "\u00e9t\u00e9"}]
