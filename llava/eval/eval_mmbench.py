"""`python -m llava.eval.eval_mmbench --annotation-file mmbench_dev.tsv --result-file A.jsonl`: MMBench circular
accuracy on a split with answers (dev), from the answers of `model_vqa_mmbench --all-rounds`: a question counts only
when every rotation of its options was answered right (see llava.eval.mmbench). Also prints the accuracy of the
first rotation alone and the circular accuracy per category. Test splits are scored by MMBench's server: make the
upload file with scripts/convert_mmbench_for_submission.py."""

from __future__ import annotations

import argparse

from llava.eval.files import SCORER_ERRORS, main_entry, read_jsonl
from llava.eval.mmbench import circular_scores, read_tsv


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="MMBench circular accuracy")
    p.add_argument("--annotation-file", type=str, required=True)
    p.add_argument("--result-file", type=str, required=True)
    args = p.parse_args(argv)
    _, rows = read_tsv(args.annotation_file)
    s = circular_scores(rows, read_jsonl(args.result_file))
    print(f"Questions: {s['questions']} (answered {s['answered']})")
    print(f"Circular accuracy: {s['circular']:.2f}%   first rotation only: {s['single']:.2f}%")
    for category, acc in s["by_category"].items():
        print(f"  {category}: {acc:.2f}%")
    return s


if __name__ == "__main__":
    main_entry(main, SCORER_ERRORS)
