"""Dataset rows: loading, validation (errors name the row), and prompt tokenisation with the chat template."""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any


def bundled_gsm8k_path() -> str:
    """The 200 GSM8K training problems shipped with rlcore (MIT, see rlcore/data/GSM8K_LICENSE)."""
    return os.path.join(os.path.dirname(__file__), "data", "gsm8k_sample.jsonl")


class DatasetError(ValueError):
    """A dataset row is unusable; the message names the dataset, the row and the field."""


def load_rows(source: Any, name: str = "train_dataset") -> list[dict[str, Any]]:
    """Rows as a list of dicts from a list of dicts, a ``datasets.Dataset``, or a ``.jsonl``/``.json`` path.

    Files must be UTF-8 (a leading byte-order mark is allowed); a byte sequence that is not, or a line that is
    not JSON, is reported with the file and line.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise DatasetError(f"{name}: no such file {path!r}")
        with open(path, "rb") as handle:
            data = handle.read()
        if data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8):]
        source = _read_jsonl(data, path, name) if path.endswith(".jsonl") else _read_json(data, path, name)
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        source = source.to_list()
    if isinstance(source, Mapping) or not isinstance(source, Iterable) or isinstance(source, (str, bytes)):
        raise DatasetError(f"{name}: expected a list of dict rows, a datasets.Dataset or a .jsonl path, got "
                           f"{type(source).__name__}")
    rows = list(source)
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DatasetError(f"{name}: row {index} is a {type(row).__name__}, expected a dict")
    return [dict(row) for row in rows]


def _read_jsonl(data: bytes, path: str, name: str) -> list[Any]:
    rows = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        text = _decode(line, path, number, name)
        if not text.strip():
            continue
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as error:
            raise DatasetError(f"{name}: {path} line {number} is not valid JSON: {error}") from None
    return rows


def _read_json(data: bytes, path: str, name: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        _decode(data.split(b"\n")[line - 1], path, line, name)  # raises, with the column
        raise  # pragma: no cover - _decode always raises here
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{name}: {path} is not valid JSON: {error}") from None


def _decode(line: bytes, path: str, number: int, name: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{name}: {path} line {number} is not UTF-8 text (byte {line[error.start]:#04x} at "
                           f"column {error.start + 1}); re-encode the file as UTF-8") from None


def _check_text(value: Any, where: str) -> None:
    """Raises DatasetError if a string anywhere in ``value`` cannot be encoded (a lone surrogate such as
    "\\ud800", which JSON's ``\\ud800`` escape produces): the tokenizer would fail on it mid-training, and again
    at the same step after every resume. Rejected rather than repaired, so the data means what it says."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise DatasetError(f"{where} holds text that is not valid Unicode: {value[error.start]!r} (a lone "
                               f"surrogate) at character {error.start}; fix or drop this row") from None
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_text(key, f"{where} (key {key!r:.40})")
            _check_text(item, f"{where}[{key!r:.40}]")
    elif isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            _check_text(item, f"{where}[{position}]")


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list)


def validate_rows(rows: list[dict[str, Any]], required_columns: Mapping[str, Any] | None = None,
                  name: str = "train_dataset") -> None:
    """Checks every row has a usable ``prompt`` and the columns the rewards read, with the right types."""
    if not rows:
        raise DatasetError(f"{name} is empty")
    required_columns = dict(required_columns or {})
    for index, row in enumerate(rows):
        for column, value in row.items():
            _check_text(value, f"{name} row {index}: field {column!r}")
        if "prompt" not in row:
            raise DatasetError(f"{name} row {index}: missing field 'prompt' (fields: {sorted(row)})")
        prompt = row["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DatasetError(f"{name} row {index}: field 'prompt' is empty")
        elif isinstance(prompt, list):
            if not prompt:
                raise DatasetError(f"{name} row {index}: field 'prompt' is an empty message list")
            for turn, message in enumerate(prompt):
                if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
                        and isinstance(message.get("content"), str)):
                    raise DatasetError(f"{name} row {index}: prompt message {turn} must be a dict with string "
                                       f"'role' and 'content', got {message!r:.100}")
        else:
            raise DatasetError(f"{name} row {index}: field 'prompt' must be a string or a list of chat messages, "
                               f"got {type(prompt).__name__}")
        for column, expected in required_columns.items():
            if column not in row:
                raise DatasetError(f"{name} row {index}: missing field {column!r}, which a reward function reads")
            if not isinstance(row[column], expected):
                names = "/".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
                raise DatasetError(f"{name} row {index}: field {column!r} must be {names}, got "
                                   f"{type(row[column]).__name__} {row[column]!r:.60}")


def prompt_token_ids(tokenizer, prompt: str | list[dict[str, str]], max_prompt_length: int | None
                     ) -> tuple[list[int], bool]:
    """Token ids of a prompt (chat template applied to message lists) and whether it was truncated.

    Prompts longer than ``max_prompt_length`` keep their last tokens: the end of a prompt (the question and
    the assistant header) matters most for what the model writes next.
    """
    if is_conversational(prompt):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ids = list(ids)
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        return ids[-max_prompt_length:], True
    return ids, False
