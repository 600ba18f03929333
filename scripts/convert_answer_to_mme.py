"""python scripts/convert_answer_to_mme.py --experiment NAME, run in playground/data/eval/MME like the original's
convert_answer_to_mme.py: answers/NAME.jsonl + MME_Benchmark_release_version -> eval_tool/answers/NAME/<category>.txt,
the files MME's calculation reads (`python -m llava.eval.eval_mme --results_dir eval_tool/answers/NAME`)."""

from __future__ import annotations

import argparse
import os

from llava.eval.convert import mme_category_lines, mme_ground_truth
from llava.eval.files import SCORER_ERRORS, main_entry, read_jsonl


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description="MME answers -> per-category files for MME's calculation")
    p.add_argument("--experiment", type=str, required=True)
    p.add_argument("--data-path", type=str, default="MME_Benchmark_release_version", help="ours")
    p.add_argument("--answers-dir", type=str, default="answers", help="ours: where NAME.jsonl is")
    p.add_argument("--out-dir", type=str, default=os.path.join("eval_tool", "answers"), help="ours")
    args = p.parse_args(argv)
    truth = mme_ground_truth(args.data_path)
    answers = read_jsonl(os.path.join(args.answers_dir, f"{args.experiment}.jsonl"))
    out = os.path.join(args.out_dir, args.experiment)
    os.makedirs(out, exist_ok=True)
    for category, lines in mme_category_lines(answers, truth).items():
        with open(os.path.join(out, f"{category}.txt"), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
    return out


if __name__ == "__main__":
    main_entry(main, SCORER_ERRORS)
