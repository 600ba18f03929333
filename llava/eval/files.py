"""Reading and writing the evaluation files (JSONL question / answer files, JSON results: one reader for all
runners, scorers and converters) and the command lines' one-line error for a missing or malformed file."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable


def read_jsonl(path: str) -> list[dict]:
    """Every non-blank line of a JSONL file, parsed (a malformed line is an error naming its line number)."""
    rows = []
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def read_jsonl_lenient(path: str) -> tuple[list[dict], int]:
    """(rows, how many lines could not be parsed), for the submission converters, which skip and count bad lines
    as the original's do."""
    rows, bad = [], 0
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return rows, bad


def read_json(path: str):
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, data) -> None:
    """JSON to `path`, creating its folder."""
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def write_jsonl(path: str, rows) -> None:
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def main_entry(fn: Callable, errors: tuple[type[BaseException], ...] = (FileNotFoundError,)) -> None:
    """Run a command line's main, reporting `errors` (a missing file; for scorers also ValueError, which they raise
    for malformed input) as one line instead of a traceback."""
    try:
        fn()
    except errors as e:
        sys.exit(f"error: {e}")


SCORER_ERRORS = (FileNotFoundError, ValueError)
