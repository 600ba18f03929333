"""python scripts/convert_seed_for_submission.py --annotation-file SEED-Bench.json --result-file merge.jsonl
--result-upload-file U.jsonl [--extract-letter]: prints SEED-Bench accuracy per question type, in total and for
image and video questions (a reply must equal the answer letter, as in the original; `--extract-letter` reads the
letter out of longer replies first), and writes the leaderboard's {question_id, prediction} lines."""

from __future__ import annotations

import argparse

from llava.eval.convert import seed_upload
from llava.eval.files import SCORER_ERRORS, main_entry, read_json, read_jsonl, write_jsonl
from llava.eval.scoring import seed_scores


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="SEED-Bench accuracy and upload file")
    p.add_argument("--annotation-file", type=str, required=True)
    p.add_argument("--result-file", type=str, required=True)
    p.add_argument("--result-upload-file", type=str, required=True)
    p.add_argument("--extract-letter", action="store_true", help="ours: read the option letter out of the reply")
    args = p.parse_args(argv)
    data = read_json(args.annotation_file)
    type_names = {i: name for name, i in data["question_type"].items()}
    replies = {str(r["question_id"]): r["text"] for r in read_jsonl(args.result_file)}
    scores = seed_scores(data["questions"], replies, type_names, extract_letter=args.extract_letter)
    for name, acc in scores["by_type"].items():
        print(f"{name}: {acc:.2f}%")
    print(f"Total accuracy: {scores['total']:.2f}%")
    for kind in ("image", "video"):
        if kind in scores:
            print(f"{kind} accuracy: {scores[kind]:.2f}%")
    rows, missing = seed_upload(data["questions"], replies)
    if missing:
        print(f"{missing} questions have no answer: their prediction is empty")
    write_jsonl(args.result_upload_file, rows)
    return scores


if __name__ == "__main__":
    main_entry(main, SCORER_ERRORS)
