"""python scripts/convert_gqa_for_eval.py --src merge.jsonl --dst testdev_balanced_predictions.json: GQA answers
-> the predictions file of GQA's eval.py (or `python -m llava.eval.eval_gqa`)."""

from __future__ import annotations

import argparse

from llava.eval.convert import gqa_predictions
from llava.eval.files import SCORER_ERRORS, main_entry, read_jsonl, write_json


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="GQA answers -> GQA predictions JSON")
    p.add_argument("--src", type=str, required=True)
    p.add_argument("--dst", type=str, required=True)
    args = p.parse_args(argv)
    write_json(args.dst, gqa_predictions(read_jsonl(args.src)))


if __name__ == "__main__":
    main_entry(main, SCORER_ERRORS)
