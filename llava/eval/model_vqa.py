"""`python -m llava.eval.model_vqa`: the original's runner for a question JSONL ({question_id, image, text}) ->
answers JSONL, same flags; answered through the engine (see llava.eval.vqa)."""

from __future__ import annotations

import argparse

from llava.eval.files import main_entry, read_jsonl
from llava.eval.vqa import Question, add_common_args, run


def questions_of(rows: list[dict]) -> list[Question]:
    return [Question(r["question_id"], "<image>\n" + r["text"], r["text"], r["image"]) for r in rows]


def build_parser(max_new_tokens: int = 1024) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LLaVA VQA runner: question JSONL -> answers JSONL")
    add_common_args(p, conv_mode="llava_v1", temperature=0.2, max_new_tokens=max_new_tokens)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args, questions_of(read_jsonl(args.question_file)))


if __name__ == "__main__":
    main_entry(main)
