"""`python -m train.evaluate`: batched greedy answers, normalised exact match, POPE-style yes/no figures.

Promises:
- `--benchmark easyvqa` asks every easy-VQA test question (or a seeded random `--limit N` subset) with LLaVA-1.5's
  short-answer prompt and scores exact match after normalisation (lower case, first line, outer punctuation and a
  leading article removed), overall and per question type (yes/no, colour, shape), plus yes/no precision, recall,
  F1 and yes-ratio with "yes" as the positive class, as POPE reports them.
- `--questions FILE.jsonl` takes LLaVA's question format (`{question_id, image, text}`) and writes LLaVA's answer
  JSONL (`{question_id, prompt, text, answer_id, model_id, metadata}`), so other benchmarks plug in.
- `--rows FILE.json` asks the first human turn of LLaVA training-format rows (train/scenes.py's test.json and
  paraphrase_test.json) and scores the answers against their gpt turn with `train.scenes_eval.score` (per family,
  caption object recall). A question may carry several images (`image` a list, its `<image>` markers in the text
  where the images go); without markers, one `<image>` line per image opens the prompt.
- A JSON report and a markdown report are written to `--out-dir`; the LAST printed line is one JSON object with at
  least `accuracy` (0-1) and `n`.
- Prompts are built by the one renderer (`LoadedModel.render`). By default answers come from the serving engine
  (greedy, the template's stop tokens and strings, continuous batching, prefix and image-feature reuse) at the
  precision chosen by `--dtype` / `--quantization`, so the score is the served model's. `--backend generate` uses
  transformers' `generate`: questions about the same image share one prefill of their common prefix, whose KV
  cache is repeated per question (the same greedy answers as separate left-padded prompts, tested).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from llava.hardware import cpu_info
from llava.loading import LoadedModel, load_model
from llava.templates import IMAGE_PLACEHOLDER, stop_token_ids
from train import easyvqa, scenes_eval
from train.data import read_rows


@dataclass(frozen=True)
class Item:
    qid: str | int
    image: str | tuple[str, ...] | None  # one path, or several (in the order of the prompt's <image> markers)
    prompt: str  # the user's text; without <image> markers, one opening line per image is added
    answer: str | None = None  # reference, when known
    qtype: str | None = None


def normalize(text: str) -> str:
    """First line, lower case, outer whitespace/punctuation and a leading article removed."""
    text = text.strip().split("\n")[0].strip().lower()
    text = text.strip(" .,!?;:\"'`")
    return re.sub(r"^(a|an|the)\s+", "", text)


def easyvqa_items(limit: int | None, seed: int = 0) -> list[Item]:
    qs = easyvqa.questions("test")
    if limit is not None and limit < len(qs):
        qs = sorted(random.Random(seed).sample(qs, limit), key=lambda q: q.qid)
    return [Item(q.qid, q.image, easyvqa.prompt(q.text), q.answer, q.type) for q in qs]


def image_paths(it: Item) -> tuple[str, ...]:
    if it.image is None:
        return ()
    return (it.image,) if isinstance(it.image, str) else tuple(it.image)


def user_content(it: Item) -> str:
    """The user turn: the prompt, opened by one `<image>` line per image unless it places its markers itself."""
    if IMAGE_PLACEHOLDER in it.prompt:
        return it.prompt
    return (IMAGE_PLACEHOLDER + "\n") * len(image_paths(it)) + it.prompt


def _in_folder(image, folder: Path | None):
    if image is None or folder is None:
        return image
    return str(folder / image) if isinstance(image, str) else tuple(str(folder / i) for i in image)


def row_items(rows: Sequence[dict], image_folder: Path | None, limit: int | None = None) -> list[Item]:
    """LLaVA rows -> one question each (the first human turn; answer = the last gpt turn; type = `family`)."""
    items = []
    for row in rows[:limit]:
        text = row["conversations"][0]["value"]
        image = row.get("image")
        if isinstance(image, str):  # a single image: its marker line goes, the renderer adds it back
            text = text.replace(IMAGE_PLACEHOLDER + "\n", "", 1).replace(IMAGE_PLACEHOLDER, "")
        items.append(Item(row["id"], _in_folder(image, image_folder), text, row["conversations"][-1]["value"],
                          row.get("family")))
    return items


def jsonl_items(path: Path, image_folder: Path | None, limit: int | None) -> list[Item]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "question_id" not in row or "text" not in row:
            raise ValueError(f"{path}: line {n}: a question needs question_id and text, got keys {sorted(row)}")
        image = row.get("image")
        image = tuple(image) if isinstance(image, list) else image
        items.append(Item(row["question_id"], _in_folder(image, image_folder), row["text"], row.get("answer"),
                          row.get("category")))
    return items[:limit]


class ImageMemo:
    """An item's processed images, each image list processed once (easy-VQA asks ~10 questions per image)."""

    def __init__(self, lm: LoadedModel):
        self.lm, self.memo = lm, {}

    def __call__(self, it: Item) -> list:
        paths = image_paths(it)
        if paths not in self.memo:
            self.memo[paths] = self.lm.process_images(list(paths)) if paths else []
        return self.memo[paths]


class Answerer:
    """Batched greedy generation for (image, prompt) items with a loaded model."""

    def __init__(self, lm: LoadedModel, max_new_tokens: int = 8):
        self.lm, self.max_new_tokens = lm, max_new_tokens
        self.stop_ids = stop_token_ids(lm.template, lm.tokenizer)
        self.pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self._images = ImageMemo(lm)

    def _prompt(self, it: Item) -> tuple[list[int], list]:
        images = self._images(it)
        return self.lm.render([{"role": "user", "content": user_content(it)}], images).input_ids, images

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return self.lm.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens, do_sample=False,
                eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **kwargs,
            )

    def _decode(self, out: torch.Tensor, width: int) -> list[str]:
        return [self.lm.tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]

    @torch.no_grad()
    def __call__(self, batch: Sequence[Item]) -> list[str]:
        """Answers for any batch: every prompt left-padded, images given as pixel values."""
        rows, pixels = [], []
        for it in batch:
            ids, images = self._prompt(it)
            rows.append(ids)
            pixels += [im.pixel_values for im in images]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):  # left padding: every prompt ends where generation starts
            ids[b, width - len(r):], mask[b, width - len(r):] = torch.tensor(r), 1
        kwargs = {"pixel_values": torch.stack(pixels)} if pixels else {}
        return self._decode(self._generate(ids, mask, **kwargs), width)

    @torch.no_grad()
    def same_image(self, batch: Sequence[Item]) -> list[str]:
        """Answers for questions about ONE image: the shared prefix (system, image tokens...) is prefilled once and
        its KV cache repeated for every question; only the differing suffixes are computed per question. The
        padding sits between prefix and suffix, masked out, with positions taken from the attention mask."""
        rows = [self._prompt(it)[0] for it in batch]
        images = self._images(batch[0])
        n = _common_prefix(rows)
        n = min(n, min(map(len, rows)) - 1)  # every row keeps at least one token to feed
        image_id = self.lm.image_token_id
        if any(image_id in r[n:] for r in rows) or len(batch) == 1 or len(images) != 1:
            return self(batch)
        with torch.no_grad():
            cache = self.lm.model(
                input_ids=torch.tensor([rows[0][:n]]), pixel_values=images[0].pixel_values[None], use_cache=True,
            ).past_key_values
        cache.batch_repeat_interleave(len(rows))
        width = max(len(r) - n for r in rows)
        ids = torch.full((len(rows), n + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            suffix = r[n:]
            ids[b, :n], mask[b, :n] = torch.tensor(r[:n]), 1
            ids[b, n + width - len(suffix):], mask[b, n + width - len(suffix):] = torch.tensor(suffix), 1
        return self._decode(self._generate(ids, mask, past_key_values=cache), n + width)


class EngineAnswerer:
    """Greedy answers through the serving engine (`llava.engine.Engine`): the same precision, kernels, batching and
    prefix reuse as a worker, so an evaluation measures what is served."""

    def __init__(self, lm: LoadedModel, max_new_tokens: int = 8, max_batch_size: int = 16):
        from llava.engine import Engine, SamplingParams

        self.lm, self.max_new_tokens = lm, max_new_tokens
        self.engine = Engine(lm.model, lm.tokenizer, eos_token_ids=stop_token_ids(lm.template, lm.tokenizer),
                             max_batch_size=max_batch_size, min_prefix_tokens=8)
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, stop=tuple(lm.template.stop_strings))
        self._images = ImageMemo(lm)

    def __call__(self, items: Sequence[Item], progress: bool = True) -> list[str]:
        from llava.engine import GenerationRequest

        handles = []
        for it in items:
            images = self._images(it)
            ids = self.lm.render([{"role": "user", "content": user_content(it)}], images).input_ids
            handles.append(self.engine.submit(GenerationRequest(ids, images, self.sampling)))
        bar = tqdm(total=len(handles), desc="answer", disable=not progress)
        while self.engine.step():
            bar.n = sum(h.done for h in handles)
            bar.refresh()
        bar.close()
        out = []
        for it, h in zip(items, handles):
            r = h.result()
            if r.finish_reason == "error":
                raise RuntimeError(f"question {it.qid}: {r.error}")
            out.append(r.text.strip())
        return out


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    n = 0
    for column in zip(*rows):
        if any(c != column[0] for c in column):
            break
        n += 1
    return n


def score(items: Sequence[Item], answers: Sequence[str]) -> dict:
    """Exact match overall and per type; yes/no precision/recall/F1/yes-ratio (positive class: yes)."""
    hits, per_type = [], {}
    for it, a in zip(items, answers):
        ok = normalize(a) == normalize(it.answer)
        hits.append(ok)
        per_type.setdefault(it.qtype or "other", []).append(ok)
    result = {"accuracy": sum(hits) / len(hits), "n": len(hits),
              "per_type": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(per_type.items())}}
    yn = [(normalize(a), it.answer) for it, a in zip(items, answers) if it.qtype == "yes/no"]
    if yn:
        tp = sum(p == "yes" and g == "yes" for p, g in yn)
        fp = sum(p == "yes" and g == "no" for p, g in yn)
        fn = sum(p != "yes" and g == "yes" for p, g in yn)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        result["yes_no"] = {
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(p == "yes" for p, _ in yn) / len(yn),
            "unparsed": sum(p not in ("yes", "no") for p, _ in yn),
        }
    result["answer_counts"] = dict(Counter(normalize(a) for a in answers).most_common(20))
    return result


def answer_all(answerer: Answerer, items: Sequence[Item], batch_size: int, progress: bool = True,
               share_prefix: bool = True, min_group: int = 4) -> list[str]:
    """Answers in item order. With `share_prefix`, questions are grouped by image (see `Answerer.same_image`)."""
    answers: dict[int, str] = {}
    if share_prefix:
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.image or "", []).append(i)
        # Small groups gain little from a shared prefix: they are pooled into ordinary batches.
        big = [idx for image, idx in groups.items() if image and len(idx) >= min_group]
        rest = sorted(i for image, idx in groups.items() if not image or len(idx) < min_group for i in idx)
        chunks = [idx[j:j + batch_size] for idx in big for j in range(0, len(idx), batch_size)]
        chunks += [rest[j:j + batch_size] for j in range(0, len(rest), batch_size)]
    else:
        chunks = [list(range(j, min(j + batch_size, len(items)))) for j in range(0, len(items), batch_size)]
    for chunk in tqdm(chunks, desc="answer", disable=not progress):
        batch = [items[i] for i in chunk]
        same = share_prefix and batch[0].image and all(it.image == batch[0].image for it in batch)
        out = answerer.same_image(batch) if same else answerer(batch)
        answers.update(zip(chunk, out))
    return [answers[i] for i in range(len(items))]


def markdown(report: dict) -> str:
    lines = [f"# Evaluation: {report['benchmark']} — {report['model']}", "",
             f"- questions: {report['n']}", f"- accuracy: {report['accuracy']:.4f}",
             f"- seconds: {report['seconds']:.0f}", "", "| type | n | accuracy |", "|---|---|---|"]
    lines += [f"| {t} | {v['n']} | {v['accuracy']:.4f} |" for t, v in report.get("per_type", {}).items()]
    if "yes_no" in report:
        y = report["yes_no"]
        lines += ["", "| yes/no precision | recall | F1 | yes-ratio | unparsed |", "|---|---|---|---|---|",
                  f"| {y['precision']:.4f} | {y['recall']:.4f} | {y['f1']:.4f} | {y['yes_ratio']:.4f} | {y['unparsed']} |"]
    return "\n".join(lines) + "\n"


def write_answers_jsonl(path: Path, items: Sequence[Item], answers: Sequence[str], model_id: str) -> None:
    with path.open("w") as f:
        for it, a in zip(items, answers):
            f.write(json.dumps({"question_id": it.qid, "prompt": it.prompt, "text": a,
                                "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}) + "\n")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True, help="HF llava folder, 'default', or any path load_model accepts")
    p.add_argument("--model-base", default=None)
    p.add_argument("--template", default=None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--benchmark", choices=["easyvqa"])
    src.add_argument("--questions", type=Path, help="LLaVA question JSONL ({question_id, image, text})")
    src.add_argument("--rows", type=Path, help="LLaVA rows with answers and families (train.scenes test.json); "
                     "images relative to the file's folder unless --image-folder")
    p.add_argument("--image-folder", type=Path, default=None)
    p.add_argument("--answers-file", type=Path, default=None, help="answer JSONL (default: <out-dir>/answers.jsonl)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: what this machine "
                   "runs fastest, see llava.hardware)")
    p.add_argument("--quantization", default="auto",
                   help="auto (default: what a worker serves on this machine) | none | int8 | int4 (CPU) | 8bit | 4bit "
                        "(bitsandbytes)")
    p.add_argument("--backend", choices=["engine", "generate"], default="engine",
                   help="engine: the serving engine (default); generate: transformers' generate in padded batches")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-share-prefix", action="store_true",
                   help="do not reuse one image's prompt prefix (KV cache) across its questions")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lm = load_model(args.model_path, model_base=args.model_base, template=args.template, dtype=args.dtype,
                    quantization=args.quantization)
    bench = args.benchmark or (args.questions or args.rows).stem
    rows = read_rows(args.rows)[:args.limit] if args.rows else None
    if rows is not None:
        items = row_items(rows, args.image_folder or args.rows.parent)
    elif args.benchmark:
        items = easyvqa_items(args.limit, args.seed)
    else:
        items = jsonl_items(args.questions, args.image_folder, args.limit)
    out_dir = args.out_dir or Path("runs") / "eval" / f"{lm.name}-{bench}-{len(items)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.backend == "engine":
        answers = EngineAnswerer(lm, args.max_new_tokens, min(args.batch_size, 64))(items, not args.no_progress)
    else:
        answers = answer_all(Answerer(lm, args.max_new_tokens), items, args.batch_size, not args.no_progress,
                             share_prefix=not args.no_share_prefix)
    seconds = time.perf_counter() - t0
    write_answers_jsonl(args.answers_file or out_dir / "answers.jsonl", items, answers, lm.name)
    report = {"benchmark": bench, "model": args.model_path, "n": len(items), "seconds": seconds,
              "backend": args.backend, "dtype": str(lm.dtype).removeprefix("torch."),
              "quantization": lm.quantization, "cpu": cpu_info().summary()}
    if rows is not None:
        report.update(scenes_eval.score(rows, {str(it.qid): a for it, a in zip(items, answers)}))
        report["accuracy"] = report["overall"]
    elif all(it.answer is not None for it in items):
        report.update(score(items, answers))
    else:
        report["accuracy"] = None  # no references: answers only
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    if report["accuracy"] is not None:
        (out_dir / "report.md").write_text(markdown(report))
    summary = {k: report[k] for k in ("accuracy", "n", "seconds", "benchmark", "dtype", "quantization") if k in report}
    if "families" in report:
        summary["families"] = {f: v["score"] for f, v in report["families"].items()}
    if "per_type" in report:
        summary["per_type"] = {t: round(v["accuracy"], 4) for t, v in report["per_type"].items()}
    if "yes_no" in report:
        summary["yes_no_f1"] = round(report["yes_no"]["f1"], 4)
        summary["yes_ratio"] = round(report["yes_no"]["yes_ratio"], 4)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
