"""easy-VQA test questions as an lmms-eval task: images read from the installed `easy-vqa` package by id (the data
file next to this holds ids, questions and answers only, so nothing is fetched from a hub)."""

from __future__ import annotations

import re
from functools import lru_cache

from PIL import Image

SHORT_ANSWER = "Answer the question using a single word or phrase."


@lru_cache(maxsize=1)
def _image_paths() -> dict:
    import easy_vqa

    return easy_vqa.get_test_image_paths()


def doc_to_visual(doc: dict) -> list:
    return [Image.open(_image_paths()[int(doc["image_id"])]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def normalize(text: str) -> str:
    """train.evaluate's rule: first line, lower case, outer punctuation and a leading article removed."""
    text = text.strip().split("\n")[0].strip().lower().strip(" .,!?;:\"'`")
    return re.sub(r"^(a|an|the)\s+", "", text)


def process_results(doc: dict, results: list) -> dict:
    return {"exact_match": float(normalize(results[0]) == doc["answer"])}


def yes_no_docs(dataset):
    return dataset.filter(lambda d: d["answer"] in ("yes", "no"))


def yes_no_target(doc: dict) -> int:
    return ["yes", "no"].index(doc["answer"])
