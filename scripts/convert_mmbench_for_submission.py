"""python scripts/convert_mmbench_for_submission.py --annotation-file SPLIT.tsv --result-dir DIR --upload-dir UP
--experiment NAME: DIR/NAME.jsonl -> UP/NAME.xlsx, MMBench's upload table (the TSV without hint, category, source,
image, comment, l2-category; a `prediction` column at position 6 with each question's first-rotation reply). Written
as .xlsx when openpyxl is installed, else as UP/NAME.tsv (the same table; convert it to xlsx for the upload page)."""

from __future__ import annotations

import argparse
import os

from llava.eval.files import SCORER_ERRORS, main_entry, read_jsonl
from llava.eval.mmbench import read_tsv, submission_table, write_table


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description="MMBench answers -> upload table")
    p.add_argument("--annotation-file", type=str, required=True)
    p.add_argument("--result-dir", type=str, required=True)
    p.add_argument("--upload-dir", type=str, required=True)
    p.add_argument("--experiment", type=str, required=True)
    args = p.parse_args(argv)
    header, rows = read_tsv(args.annotation_file)
    answers = read_jsonl(os.path.join(args.result_dir, f"{args.experiment}.jsonl"))
    os.makedirs(args.upload_dir, exist_ok=True)
    path = write_table(os.path.join(args.upload_dir, args.experiment), submission_table(header, rows, answers))
    if path.endswith(".tsv"):
        print(f"openpyxl is not installed: wrote {path} (the upload table as TSV) instead of .xlsx")
    return path


if __name__ == "__main__":
    main_entry(main, SCORER_ERRORS)
