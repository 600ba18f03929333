"""easy-VQA (the `easy-vqa` package: 64x64 shapes, 13 answers) as LLaVA training data and as a benchmark.

Promises:
- `questions(split)` lists every question with its image path and its type (yes/no, colour, shape).
- `captions(split)` gives stage-1 rows `{id, image, conversations}` whose caption ("a blue rectangle") comes from the
  image's own questions (see `image_attributes`); images whose colour or shape they do not reveal are left out and
  counted.
- `dialogues(split)` gives stage-2 rows: an image's questions grouped into multi-turn dialogues (shuffled, at most
  `max_turns` a dialogue). The first question carries LLaVA-1.5's short-answer instruction, exactly the prompt the
  evaluation uses, so one image costs its feature tokens once for ~10 question/answer pairs. Multi-turn rows let
  later answers lean on earlier ones (a shortcut the single-question evaluation cannot use); `branches` rows carry
  the instruction on every question for training the exchanges independently (tree-packed, see train/data.py).
- `write_json(rows, path)` writes the LLaVA JSON list; image paths are absolute, so no image folder is needed.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

SHORT_ANSWER = "Answer the question using a single word or phrase."
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
QUESTION_TYPES = ("yes/no", "colour", "shape")


class EasyVQAError(RuntimeError):
    """The easy-vqa package is missing or a split name is unknown."""


@dataclass(frozen=True)
class Question:
    qid: int
    text: str
    answer: str
    image_id: int
    image: str  # absolute path

    @property
    def type(self) -> str:
        return question_type(self.answer)


def question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in COLORS:
        return "colour"
    if answer in SHAPES:
        return "shape"
    raise EasyVQAError(f"unexpected easy-VQA answer {answer!r}")


def prompt(question: str) -> str:
    """The human turn for a question (LLaVA-1.5's VQA short-answer format)."""
    return f"{question}\n{SHORT_ANSWER}"


def questions(split: str) -> list[Question]:
    try:
        import easy_vqa
    except ImportError as e:
        raise EasyVQAError("easy-VQA needs the easy-vqa package: pip install easy-vqa (the train extra)") from e
    getters = {
        "train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
        "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths),
    }
    if split not in getters:
        raise EasyVQAError(f"unknown easy-VQA split {split!r}; valid: {', '.join(getters)}")
    get_q, get_paths = getters[split]
    texts, answers, image_ids = get_q()
    paths = get_paths()
    return [Question(i, t, a, im, paths[im]) for i, (t, a, im) in enumerate(zip(texts, answers, image_ids))]


def by_image(qs: list[Question]) -> dict[int, list[Question]]:
    out: dict[int, list[Question]] = defaultdict(list)
    for q in qs:
        out[q.image_id].append(q)
    return dict(sorted(out.items()))


def _named(text: str, vocab: tuple[str, ...]) -> list[str]:
    words = text.rstrip("?").split()
    return [w for w in vocab if w in words]


def image_attributes(qs: list[Question]) -> tuple[str | None, str | None]:
    """(colour, shape) of one image as its questions reveal them; None where they do not.

    A colour/shape answer names it directly; a yes/no question naming one colour or shape says it is present or
    absent (a "not" in the question flips the answer), and a value is also known once all others are absent.
    """
    present: dict[str, set[str]] = {"colour": set(), "shape": set()}
    absent: dict[str, set[str]] = {"colour": set(), "shape": set()}
    for q in qs:
        if q.type in ("colour", "shape"):
            present[q.type].add(q.answer)
            continue
        negated = " not " in f" {q.text} "
        for kind, vocab in (("colour", COLORS), ("shape", SHAPES)):
            named = _named(q.text, vocab)
            if len(named) == 1:
                (present if (q.answer == "yes") != negated else absent)[kind].add(named[0])
    out = []
    for kind, vocab in (("colour", COLORS), ("shape", SHAPES)):
        known = present[kind] or (set(vocab) - absent[kind])
        out.append(next(iter(known)) if len(known) == 1 else None)
    return out[0], out[1]


def captions(split: str = "train", limit: int | None = None) -> tuple[list[dict], Counter]:
    """Stage-1 rows and a count of images left out (no known colour or shape)."""
    rows, left_out = [], Counter()
    for image_id, qs in by_image(questions(split)).items():
        colour, shape = image_attributes(qs)
        if colour is None or shape is None:
            left_out["colour or shape unknown"] += 1
            continue
        rows.append({
            "id": f"easyvqa-{split}-{image_id}-caption",
            "image": qs[0].image,
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a {colour} {shape}"}],
        })
    return rows[:limit], left_out


def dialogues(split: str = "train", *, max_turns: int = 12, seed: int = 0, limit_images: int | None = None,
              instruction_every_turn: bool = False) -> list[dict]:
    """Stage-2 rows: each image's questions (shuffled) in dialogues of at most `max_turns` exchanges.

    With `instruction_every_turn`, every question carries the short-answer instruction (rows meant to be trained as
    independent single-turn exchanges, `LlavaDataset(independent_turns=True)`)."""
    rng = random.Random(seed)
    rows = []
    for image_id, qs in list(by_image(questions(split)).items())[:limit_images]:
        qs = list(qs)
        rng.shuffle(qs)
        for part, start in enumerate(range(0, len(qs), max_turns)):
            chunk = qs[start:start + max_turns]
            conv = []
            for j, q in enumerate(chunk):
                text = prompt(q.text) if j == 0 or instruction_every_turn else q.text
                human = f"<image>\n{text}" if j == 0 else text
                conv += [{"from": "human", "value": human}, {"from": "gpt", "value": q.answer}]
            rows.append({"id": f"easyvqa-{split}-{image_id}-{part}", "image": qs[0].image, "conversations": conv})
    return rows


def write_json(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # whole file or none, also with several writers
    tmp.write_text(json.dumps(rows, indent=0))
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m train.easyvqa --out DIR`: write the LLaVA JSON files (captions and dialogues, train and test)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m train.easyvqa", description=main.__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-turns", type=int, default=12)
    args = p.parse_args(argv)
    for split in ("train", "test"):
        rows, left_out = captions(split)
        print(write_json(rows, args.out / f"easyvqa-{split}-captions.json"), len(rows), dict(left_out))
        rows = dialogues(split, max_turns=args.max_turns)
        print(write_json(rows, args.out / f"easyvqa-{split}-dialogues.json"), len(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
