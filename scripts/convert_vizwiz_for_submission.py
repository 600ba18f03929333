"""python scripts/convert_vizwiz_for_submission.py --annotation-file llava_test.jsonl --result-file A.jsonl
--result-upload-file U.json: VizWiz answers -> the server's [{image, answer}] (answers normalised as the VQA
evaluation does; every question must be answered)."""

from __future__ import annotations

import argparse

from llava.eval.convert import vizwiz_submission
from llava.eval.files import SCORER_ERRORS, main_entry, read_jsonl, read_jsonl_lenient, write_json


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="VizWiz answers -> submission JSON")
    p.add_argument("--annotation-file", type=str, required=True)
    p.add_argument("--result-file", type=str, required=True)
    p.add_argument("--result-upload-file", type=str, required=True)
    args = p.parse_args(argv)
    answers, bad = read_jsonl_lenient(args.result_file)
    questions = read_jsonl(args.annotation_file)
    print(f"total results: {len(answers)}, total split: {len(questions)}, error_line: {bad}")
    write_json(args.result_upload_file, vizwiz_submission(answers, questions))


if __name__ == "__main__":
    main_entry(main, SCORER_ERRORS)
