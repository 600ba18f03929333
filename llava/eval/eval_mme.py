"""`python -m llava.eval.eval_mme --results_dir answers/EXPERIMENT`: MME's calculation over the per-category files
that scripts/convert_answer_to_mme.py writes (`{category}.txt`, lines `image<TAB>question<TAB>truth<TAB>reply`, the
two questions of an image adjacent). Prints each category's score (acc + acc+) and the Perception and Cognition
totals, as MME's eval_tool/calculation.py does (`--partial`, ours: totals over the categories present, for
MME-style question sets with fewer categories)."""

from __future__ import annotations

import argparse
import os

from llava.eval.files import SCORER_ERRORS, main_entry
from llava.eval.scoring import MME_CATEGORIES, mme_category_scores, mme_totals


def read_category(path: str) -> list[tuple[str, str]]:
    """(truth, reply) per line of one category file."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 4 or fields[2].lower() not in ("yes", "no"):
                raise ValueError(f"{path}:{n}: expected image, question, yes|no, reply separated by tabs")
            rows.append((fields[2], fields[3]))
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="MME scores per category and Perception / Cognition totals")
    p.add_argument("--results_dir", type=str, required=True)
    p.add_argument("--partial", action="store_true",
                   help="ours: totals over the categories present (MME's calculation needs all of them)")
    args = p.parse_args(argv)
    per_category = {}
    for names in MME_CATEGORIES.values():
        for name in names:
            path = os.path.join(args.results_dir, name + ".txt")
            if os.path.isfile(path):
                per_category[name] = mme_category_scores(read_category(path))
    totals = mme_totals(per_category, partial=args.partial)
    for kind, names in MME_CATEGORIES.items():
        names = [n for n in names if n in per_category]
        print(f"=========== {kind} ===========")
        print(f"total score: {totals[kind]}" + (f" ({len(names)} of {len(MME_CATEGORIES[kind])} categories)"
                                                if args.partial else "") + "\n")
        for name in names:
            s = per_category[name]
            print(f"\t {name}  score: {s['score']}  (acc {s['acc']:.2f}, acc+ {s['acc_plus']:.2f})")
        print()
    return {"categories": per_category, **totals}


if __name__ == "__main__":
    main_entry(main, SCORER_ERRORS)
