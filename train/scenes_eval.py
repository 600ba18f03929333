"""`python -m train.scenes_eval`: score answers to the scenes questions (train/scenes.py) per family, and write those
questions in the question format of the LLaVA runners.

Promises:
- `score(rows, answers)` takes LLaVA rows (`{id, conversations, family, ...}`, the reference being the gpt turn) and
  answers by question id. A question scores 1 when the answer equals the reference after both are lower-cased,
  stripped and rid of one final period; a caption scores its object recall: the fraction of the reference's
  (colour, shape) pairs, counted with multiplicity, that the answer names as "<colour> <shape>" ("two red
  circles" names two).
  A question without an answer scores 0 and is counted as missing. Reported: per family and per kind
  {n, score}, and overall (the mean over all questions). A group whose references are all yes / no also reports
  `answered_yes`, the share of its questions answered "yes": a score near 0.5 with answered_yes far from 0.5 is a
  model that answers one way, not one that guesses.
- `--answers FILE.jsonl` reads the answer JSONL the runners write (`{question_id, text, ...}`), prints the report
  (last line: one JSON object) and writes it to `--out` when given.
- `--to-questions FILE.jsonl` writes single-image rows as `{question_id, image, text, answer, category}` -- what
  `llava.eval.model_vqa_loader` and `train.evaluate --questions` read (text without the `<image>` marker, which the
  runner adds; images relative to the questions file's folder, pass it as `--image-folder`). `model_vqa_loader`
  takes one image per question, so two-image rows go to FILE.multi.jsonl instead (`image` a list, `text` with its
  `<image>` markers in place), which `train.evaluate --questions` reads; `train.evaluate --rows` asks test.json as
  it is, both kinds together.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from llava.eval.files import read_jsonl
from train.data import DatasetError, read_rows
from train.scenes import COLORS, SHAPES

IMAGE = "<image>"
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_OBJECT = re.compile(rf"(?:\b({'|'.join(NUMBERS)}|[0-9])\s+)?\b({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})s?\b")


def normalize(text: str) -> str:
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def objects_named(text: str) -> Counter:
    """(colour, shape) pairs a text names, with multiplicity ("two red circles" names two)."""
    out: Counter = Counter()
    for number, colour, shape in _OBJECT.findall(text.lower()):
        out[colour, shape] += int(number) if number.isdigit() else NUMBERS.get(number, 1)
    return out


def caption_recall(answer: str, reference: str) -> float:
    ref, got = objects_named(reference), objects_named(answer)
    total = sum(ref.values())
    if not total:  # a reference naming no object: exact match
        return float(normalize(answer) == normalize(reference))
    return sum(min(n, got[k]) for k, n in ref.items()) / total


def question_score(row: dict, answer: str | None) -> float:
    if answer is None:
        return 0.0
    reference = row["conversations"][-1]["value"]
    if row.get("family") == "caption":
        return caption_recall(answer, reference)
    return float(normalize(answer) == normalize(reference))


def score(rows: list[dict], answers: dict[str, str]) -> dict:
    """Per-family and per-kind {n, score} and the overall mean (see the module docstring)."""
    by_family, by_kind = defaultdict(list), defaultdict(list)
    missing = 0
    for row in rows:
        answer = answers.get(str(row["id"]))
        missing += answer is None
        s = question_score(row, answer)
        yes_no = normalize(row["conversations"][-1]["value"]) in ("yes", "no")
        said_yes = answer is not None and normalize(answer) == "yes"
        by_family[row.get("family", "unknown")].append((s, yes_no, said_yes))
        by_kind[row.get("kind", row.get("family", "unknown"))].append((s, yes_no, said_yes))

    def summary(groups):
        out = {}
        for k, v in sorted(groups.items()):
            out[k] = {"n": len(v), "score": round(sum(s for s, _, _ in v) / len(v), 4)}
            if all(yes_no for _, yes_no, _ in v):
                out[k]["answered_yes"] = round(sum(said for _, _, said in v) / len(v), 4)
        return out

    scores = [s for v in by_family.values() for s, _, _ in v]
    return {"overall": round(sum(scores) / len(scores), 4) if scores else 0.0, "n": len(scores), "missing": missing,
            "families": summary(by_family), "kinds": summary(by_kind)}


def read_answers(path: str | Path) -> dict[str, str]:
    """question_id -> text of an answers JSONL (a later line for the same id wins)."""
    out = {}
    for n, row in enumerate(read_jsonl(str(path)), 1):
        if "question_id" not in row or "text" not in row:
            raise ValueError(f"{path}: answer {n} needs question_id and text, got keys {sorted(row)}")
        out[str(row["question_id"])] = row["text"]
    return out


def to_questions(rows: list[dict], out: Path) -> tuple[Path, Path | None]:
    """Write the runner's question JSONL (single-image rows) and FILE.multi.jsonl (two-image rows, if any)."""
    single, multi = [], []
    for row in rows:
        text = row["conversations"][0]["value"]
        q = {"question_id": row["id"], "image": row["image"], "text": text, "answer": row["conversations"][-1]["value"],
             "category": row.get("family")}
        if isinstance(row["image"], list):
            multi.append(q)
        else:
            q["text"] = text.replace(IMAGE + "\n", "", 1).replace(IMAGE, "")
            single.append(q)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(q) + "\n" for q in single))
    multi_path = out.with_suffix(".multi.jsonl") if multi else None
    if multi_path:
        multi_path.write_text("".join(json.dumps(q) + "\n" for q in multi))
    return out, multi_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.scenes_eval", description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=Path, required=True, help="test.json or paraphrase_test.json of train.scenes")
    p.add_argument("--answers", type=Path, help="answers JSONL ({question_id, text}) to score")
    p.add_argument("--out", type=Path, help="also write the report here (JSON)")
    p.add_argument("--to-questions", type=Path, help="write the runners' question JSONL here")
    args = p.parse_args(argv)
    if not args.answers and not args.to_questions:
        p.error("give --answers (to score) or --to-questions (to convert)")
    try:
        rows = read_rows(args.questions)
        if args.to_questions:
            single, multi = to_questions(rows, args.to_questions)
            print(f"{single}: single-image questions (run with --image-folder {args.questions.resolve().parent})")
            if multi:
                print(f"{multi}: two-image questions (image lists; run with train.evaluate --questions)")
        if args.answers:
            report = score(rows, read_answers(args.answers))
            if args.out:
                args.out.write_text(json.dumps(report, indent=1) + "\n")
            print(json.dumps(report))
    except (DatasetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
