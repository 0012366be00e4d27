"""Dataset rows: loading, validation (errors name the row), and prompt tokenisation with the chat template."""

from __future__ import annotations

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
    """Rows as a list of dicts from a list of dicts, a ``datasets.Dataset``, or a ``.jsonl``/``.json`` path."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise DatasetError(f"{name}: no such file {path!r}")
        with open(path, encoding="utf-8") as handle:
            if path.endswith(".jsonl"):
                rows = []
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise DatasetError(f"{name}: {path} line {number} is not valid JSON: {error}") from None
            else:
                rows = json.load(handle)
        source = rows
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        source = source.to_list()
    if isinstance(source, Mapping) or not isinstance(source, Iterable):
        raise DatasetError(f"{name}: expected a list of dict rows, a datasets.Dataset or a .jsonl path, got "
                           f"{type(source).__name__}")
    rows = list(source)
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DatasetError(f"{name}: row {index} is a {type(row).__name__}, expected a dict")
    return [dict(row) for row in rows]


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list)


def validate_rows(rows: list[dict[str, Any]], required_columns: Mapping[str, Any] | None = None,
                  name: str = "train_dataset") -> None:
    """Checks every row has a usable ``prompt`` and the columns the rewards read, with the right types."""
    if not rows:
        raise DatasetError(f"{name} is empty")
    required_columns = dict(required_columns or {})
    for index, row in enumerate(rows):
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
