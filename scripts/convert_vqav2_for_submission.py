"""python scripts/convert_vqav2_for_submission.py --split SPLIT --ckpt CKPT [--dir ./playground/data/eval/vqav2]:
DIR/answers/SPLIT/CKPT/merge.jsonl -> DIR/answers_upload/SPLIT/CKPT.json for the VQAv2 server (every question of
DIR/llava_vqav2_mscoco_test2015.jsonl, answers normalised as the VQA evaluation does; see llava.eval.convert)."""

from __future__ import annotations

import argparse
import os

from llava.eval.convert import vqav2_submission
from llava.eval.files import SCORER_ERRORS, main_entry, read_jsonl, read_jsonl_lenient, write_json


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description="VQAv2 answers -> submission JSON")
    p.add_argument("--dir", type=str, default="./playground/data/eval/vqav2")
    p.add_argument("--ckpt", type=str, required=True)
    p.add_argument("--split", type=str, required=True)
    args = p.parse_args(argv)
    answers, bad = read_jsonl_lenient(os.path.join(args.dir, "answers", args.split, args.ckpt, "merge.jsonl"))
    split = read_jsonl(os.path.join(args.dir, "llava_vqav2_mscoco_test2015.jsonl"))
    print(f"total results: {len(answers)}, total split: {len(split)}, error_line: {bad}")
    dst = os.path.join(args.dir, "answers_upload", args.split, f"{args.ckpt}.json")
    write_json(dst, vqav2_submission(answers, split))
    return dst


if __name__ == "__main__":
    main_entry(main, SCORER_ERRORS)
