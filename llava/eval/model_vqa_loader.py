"""`python -m llava.eval.model_vqa_loader`: the original's batched-loader variant of model_vqa (same files; its
default --max_new_tokens is 128). Here both answer through the engine, so they differ only in that default."""

from __future__ import annotations

from llava.eval.files import main_entry, read_jsonl
from llava.eval.model_vqa import build_parser, questions_of
from llava.eval.vqa import run


def main(argv: list[str] | None = None, loaded=None) -> int:
    args = build_parser(max_new_tokens=128).parse_args(argv)
    return run(args, questions_of(read_jsonl(args.question_file)), loaded)


if __name__ == "__main__":
    main_entry(main)
