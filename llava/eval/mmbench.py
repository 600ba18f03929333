"""MMBench's TSV (one row per question: index, question, hint, A-D, answer?, category, image as base64, ...):
reading it, the original's prompts and option rotations, circular scoring and the submission table.

Promises:
- Cells are read as the original's pandas reading sees them: pandas' default missing-value spellings ("", "nan",
  "None", "NA", ...) are missing. Options are A, B, C, D up to the first missing one.
- Round r of a question shows its options rotated left r times under the letters A, B, ...; the answer records
  `options` (shown order) and `option_char` (each shown option's own letter), as the original does. Without
  `--all-rounds` only round 0 (the TSV's order) is asked.
- Circular scoring: a reply's letter names a shown position; `option_char` turns it into the option's own letter,
  compared with the row's answer. A question counts only when every one of its rounds was answered, and right.
  Rows of a TSV that already holds rotated copies (VLMEvalKit's circular files: index + k * 1,000,000, each with its
  own answer) are grouped with their question the same way.
- An image cell of a few digits names the row whose image it shares (VLMEvalKit's files do this).
"""

from __future__ import annotations

import base64
import csv
import sys
from collections import defaultdict
from collections.abc import Sequence

from llava.eval.scoring import choice_letter

LETTERS = ("A", "B", "C", "D")
# what pandas.read_table reads as missing by default, plus the original's own "nan"/"none" in any case
_MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
            "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
SINGLE_PRED_PROMPT_CN = "请直接回答选项字母。"
# columns the original drops from the submission table; "prediction" goes in at column 6
SUBMISSION_DROPS = ("hint", "category", "source", "image", "comment", "l2-category")
CIRCULAR_STRIDE = 1_000_000


def is_missing(value: str | None) -> bool:
    return value is None or value in _MISSING or value.lower() in ("nan", "none")


def read_tsv(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of an MMBench TSV; every row must have an integer `index`."""
    csv.field_size_limit(sys.maxsize)  # base64 images are far over csv's default 128 KiB cell limit
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = list(reader.fieldnames or [])
        rows = list(reader)
    for i, row in enumerate(rows):
        try:
            row["index"] = int(row["index"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: row {i + 2} has no integer 'index' column") from None
    return header, rows


def options_of(row: dict) -> list[str]:
    out = []
    for c in LETTERS:
        if is_missing(row.get(c)):
            break
        out.append(row[c])
    return out


def question_prompt(row: dict, options: Sequence[str]) -> str:
    """hint (if any), question, then the shown options as "A. text" lines: what the answer file records."""
    text = row["question"] if is_missing(row.get("hint")) else row["hint"] + "\n" + row["question"]
    return text + "".join(f"\n{c}. {o}" for c, o in zip(LETTERS, options))


def rounds(row: dict, all_rounds: bool) -> list[tuple[int, list[str], list[str]]]:
    """(round_id, shown options, their own letters) for each round asked of this row."""
    options = options_of(row)
    chars = list(LETTERS[: len(options)])
    out = []
    for r in range(len(options) if all_rounds else 1):
        out.append((r, options[r:] + options[:r], chars[r:] + chars[:r]))
    return out


def image_bytes(row: dict, by_index: dict[int, dict]) -> bytes:
    cell = row["image"]
    if len(cell) <= 64 and cell.strip().isdigit():  # a reference to the row holding this image
        cell = by_index[int(cell)]["image"]
    return base64.b64decode(cell)


def answer_correct(answer: dict, truth: str) -> bool:
    """Whether one answer record (round) picks the true option, reading its letter against the shown options."""
    shown = answer["options"]
    letter = choice_letter(answer["text"], dict(zip(LETTERS, shown)))
    if letter is None:
        return False
    return answer["option_char"][LETTERS.index(letter)] == truth


def circular_scores(rows: Sequence[dict], answers: Sequence[dict]) -> dict:
    """Circular accuracy (percent) overall and per category, plus the accuracy of round 0 alone, over the TSV's
    questions (rows below CIRCULAR_STRIDE). The TSV must carry the `answer` column (dev splits do).

    When the answers hold any round above 0 (a `--all-rounds` run), every row needs all its rounds answered right;
    otherwise its round 0. A rotated copy of a question (index + k * CIRCULAR_STRIDE) must be right as well."""
    if rows and "answer" not in rows[0]:
        raise ValueError("this TSV has no 'answer' column (a test split): make the submission file with "
                         "scripts/convert_mmbench_for_submission.py instead")
    by_index = {r["index"]: r for r in rows}
    right: dict[tuple[int, int], bool] = {}  # (row index, round) -> answered right
    for a in answers:
        row = by_index.get(int(a["question_id"]))
        if row is None:
            raise ValueError(f"answer for question {a['question_id']}, which the TSV does not have")
        right[row["index"], a.get("round_id", 0)] = answer_correct(a, row["answer"])
    all_rounds = any(r > 0 for _, r in right)
    slots: dict[int, list[tuple[int, int]]] = defaultdict(list)  # question -> the (row, round) it needs right
    for r in rows:
        n = len(options_of(r)) if all_rounds else 1
        slots[r["index"] % CIRCULAR_STRIDE] += [(r["index"], k) for k in range(n)]
    main = [r for r in rows if r["index"] < CIRCULAR_STRIDE]
    if not main:
        raise ValueError("the TSV has no questions")
    passed = {r["index"]: all(right.get(slot, False) for slot in slots[r["index"]]) for r in main}
    per_category: dict[str, list[bool]] = defaultdict(list)
    for r in main:
        per_category[r.get("category") or "-"].append(passed[r["index"]])
    return {
        "circular": 100 * sum(passed.values()) / len(main),
        "single": 100 * sum(right.get((r["index"], 0), False) for r in main) / len(main),
        "questions": len(main),
        "answered": sum(1 for r in main if (r["index"], 0) in right),
        "by_category": {c: 100 * sum(v) / len(v) for c, v in sorted(per_category.items())},
    }


def submission_table(header: Sequence[str], rows: Sequence[dict], answers: Sequence[dict]) -> list[list]:
    """The original's upload table: the TSV without SUBMISSION_DROPS, a `prediction` column at position 6 holding
    each question's round-0 reply ("" when unanswered). Header row first."""
    replies = {int(a["question_id"]): a["text"] for a in answers if a.get("round_id", 0) == 0}
    columns = [c for c in header if c not in SUBMISSION_DROPS]
    columns.insert(min(6, len(columns)), "prediction")
    table = [columns]
    for r in rows:
        table.append([replies.get(r["index"], "") if c == "prediction" else r[c] for c in columns])
    return table


def write_table(path_without_suffix: str, table: list[list]) -> str:
    """Writes `.xlsx` when openpyxl is installed (what the upload page takes), else `.tsv`; returns the path."""
    try:
        import openpyxl
    except ImportError:
        path = path_without_suffix + ".tsv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows(table)
        return path
    path = path_without_suffix + ".xlsx"
    book = openpyxl.Workbook()
    for line in table:
        book.active.append(line)
    book.save(path)
    return path
