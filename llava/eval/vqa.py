"""Question files in, answer files out, as the original LLaVA's runners read and write them, through the engine.

Promises:
- Questions are split into `--num-chunks` parts with the original's ceil-sized chunks, so the shards of a
  multi-process run are the original's shards; `--chunk-idx` picks one.
  Rounds of one question (MMBench's option rotations) stay in one chunk.
- Each answer line is `{question_id, prompt, text, answer_id, model_id, metadata}` (`prompt` is the question as the
  original writes it, `model_id` the model's name from its path, as `get_model_name_from_path` gives it); MMBench's
  add `round_id` after the id and `options`, `option_char` after the text, in the original's order.
- An answers file that already holds some of this chunk's questions (ids, with round ids where there are rounds) is
  continued: those are skipped, nothing is written twice (a killed run resumes). Answers are written in question
  order, each flushed.
- `--conv-mode` takes the original's conversation names; an unknown one is an error listing them.
- All questions are submitted to one engine (a bounded window in flight), so they decode in batches; questions
  sharing an image encode it once and, after the first of them has computed its prompt, start from that prompt's
  cached keys and values (system turn + image tokens), prefilling only their own text (`_in_order`).
  temperature 0 is greedy; `--num_beams` other than 1 is refused (the engine decodes one sequence per request).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llava.templates import render, stop_token_ids

# the original's conversation names -> our templates (the same prompts)
CONV_MODES = {
    "v1": "vicuna_v1", "vicuna_v1": "vicuna_v1", "llava_v1": "llava_v1", "llava_llama_2": "llava_llama_2",
    "mistral_instruct": "mistral_instruct", "chatml_direct": "chatml_direct", "plain": "plain", "llama3": "llama3",
}
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
IN_FLIGHT = 64  # requests submitted to the engine at once


@dataclass
class Question:
    question_id: object
    text: str  # the user message, `<image>\n` first when there is an image
    prompt: str  # what the answer file records as the prompt (the original's cur_prompt)
    image: str | bytes | None  # file name inside --image-folder, or the encoded image itself
    round_id: int | None = None  # MMBench: which rotation of the options
    options: list[str] | None = None  # MMBench: the options in the order shown
    option_char: list[str] | None = None  # MMBench: each shown option's own letter

    @property
    def key(self) -> str:
        """What identifies this question in an answers file (for resuming)."""
        return json.dumps([self.question_id, self.round_id] if self.round_id is not None else self.question_id)

    def record(self, text: str, model_id: str) -> dict:
        """The answer line, fields in the original's order."""
        out: dict = {"question_id": self.question_id}
        if self.round_id is not None:
            out["round_id"] = self.round_id
        out.update(prompt=self.prompt, text=text)
        if self.options is not None:
            out.update(options=self.options, option_char=self.option_char)
        out.update(answer_id=uuid.uuid4().hex[:22], model_id=model_id, metadata={})
        return out


def add_common_args(p: argparse.ArgumentParser, *, conv_mode: str, temperature: float, max_new_tokens: int) -> None:
    p.add_argument("--model-path", type=str, required=True)
    p.add_argument("--model-base", type=str, default=None)
    p.add_argument("--image-folder", type=str, default="")
    p.add_argument("--question-file", type=str, required=True)
    p.add_argument("--answers-file", type=str, default="answer.jsonl")
    p.add_argument("--conv-mode", type=str, default=conv_mode)
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (ours; default auto)")
    p.add_argument("--quantization", default="auto", help="auto | none | int8 | int4 | 8bit | 4bit (ours)")


def model_name_from_path(model_path: str) -> str:
    """The original's get_model_name_from_path: the last folder, `parent_checkpoint-N` for a checkpoint folder."""
    parts = model_path.strip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def chunk_questions(questions: list[Question], n: int, k: int) -> list[Question]:
    """get_chunk over questions, the rounds of one question (consecutive, same id) counting as one item."""
    groups: list[list[Question]] = []
    for q in questions:
        if groups and q.round_id is not None and groups[-1][0].question_id == q.question_id:
            groups[-1].append(q)
        else:
            groups.append([q])
    return [q for group in get_chunk(groups, n, k) for q in group]


def get_chunk(items: list, n: int, k: int) -> list:
    """Chunk k of n, the original's way: chunks of ceil(len / n) items (the last ones may be short or empty)."""
    if n < 1 or not 0 <= k < n:
        raise SystemExit(f"--chunk-idx must be in [0, --num-chunks) and --num-chunks >= 1, got {k} of {n}")
    size = math.ceil(len(items) / n) if items else 1
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    return chunks[k] if k < len(chunks) else []


def template_for(conv_mode: str):
    from llava.templates import get_template

    if conv_mode not in CONV_MODES:
        raise SystemExit(f"--conv-mode {conv_mode!r} is not known here; valid: {', '.join(sorted(CONV_MODES))}")
    return get_template(CONV_MODES[conv_mode])


def answered_ids(answers_file: Path) -> set:
    """Question ids already in the answers file (a torn last line from a killed run is dropped)."""
    if not answers_file.is_file():
        return set()
    done, keep = set(), []
    for line in answers_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rid = row.get("round_id")
        done.add(json.dumps([row["question_id"], rid] if rid is not None else row["question_id"]))
        keep.append(line)
    answers_file.write_text("".join(k + "\n" for k in keep))
    return done


def run(args: argparse.Namespace, questions: list[Question], loaded=None) -> int:
    """Answer this chunk's questions into args.answers_file (with `loaded`, a LoadedModel, instead of loading
    args.model_path); returns how many were answered now."""
    from tqdm import tqdm

    from llava.engine import Engine, GenerationRequest
    from llava.images import load_image
    from llava.loading import load_model
    from llava.sampling import SamplingParams

    if args.num_beams != 1:
        raise SystemExit(f"--num_beams {args.num_beams}: beam search is not supported (the engine decodes one "
                         "sequence per request); the original's scripts use 1")
    template = template_for(args.conv_mode)
    questions = chunk_questions(questions, args.num_chunks, args.chunk_idx)
    answers_file = Path(os.path.expanduser(args.answers_file))
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    done = answered_ids(answers_file)
    todo = [q for q in questions if q.key not in done]
    if not todo:
        return 0
    lm = loaded or load_model(os.path.expanduser(args.model_path), model_base=args.model_base, dtype=args.dtype,
                              quantization=args.quantization)
    model_id = model_name_from_path(os.path.expanduser(args.model_path))
    stops = template.stop_strings
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=max(args.temperature, 0.0),
                              top_p=args.top_p if args.top_p is not None else 1.0, stop=stops)
    engine = Engine(lm.model, lm.tokenizer, eos_token_ids=stop_token_ids(template, lm.tokenizer),
                    context_length=lm.context_length).start()

    processed: OrderedDict = OrderedDict()  # the last images processed (a window asks about each several times)

    def request(q: Question):
        images = []
        if q.image is not None:
            key = _image_key(q)
            if key not in processed:
                src = q.image if isinstance(q.image, bytes) else os.path.join(args.image_folder, q.image)
                processed[key] = lm.process_images([load_image(src)])
                if len(processed) > 2 * IN_FLIGHT:
                    processed.popitem(last=False)
            images = processed[key]
        ids = render([{"role": "user", "content": q.text}], template, lm.tokenizer,
                     image_token_counts=[im.num_tokens for im in images], add_generation_prompt=True).input_ids
        return GenerationRequest(ids, images, sampling)

    written = 0
    try:
        with answers_file.open("a") as out, tqdm(total=len(todo), desc="answering") as bar:
            for q, result in _in_order(engine, todo, request):
                out.write(json.dumps(q.record(result.text.strip(), model_id)) + "\n")
                out.flush()
                written += 1
                bar.update()
    finally:
        engine.shutdown()
    return written


def _image_key(q: Question):
    """What identifies a question's image for sharing its prompt prefix (None: no image)."""
    if q.image is None:
        return None
    return ("bytes", hash(q.image)) if isinstance(q.image, bytes) else ("file", q.image)


def _in_order(engine, questions: list[Question], make_request) -> Iterator[tuple[Question, object]]:
    """(question, result) in question order, submitted in windows of IN_FLIGHT questions.

    Questions about one image share their prompt up to the end of the image (system turn, image tokens), but the
    engine reuses a prefix only from a request that has computed it (a running or finished one). So in each window
    the first question of each image not seen before goes first (a "leader"); once the leaders have their first
    token (their prompts computed, together in batched prefills), the window's other questions follow and prefill
    only their own text. The next window's leaders are submitted before this window's answers are collected, so
    the engine is not idle between windows."""
    seen: set = set()  # images whose prefix an earlier leader computed (kept in the engine's prefix cache, LRU)

    def lead(window):
        handles: list = [None] * len(window)
        leaders = {}
        for j, q in enumerate(window):
            key = _image_key(q)
            if key is not None and key not in seen and key not in leaders:
                leaders[key] = j
                handles[j] = engine.submit(make_request(q))
        return handles, leaders

    def follow(window, handles, leaders):
        for key, j in leaders.items():
            next(iter(handles[j]), None)  # the first event: its prompt is computed
            seen.add(key)
        for j, q in enumerate(window):
            if handles[j] is None:
                handles[j] = engine.submit(make_request(q))

    windows = [questions[i : i + IN_FLIGHT] for i in range(0, len(questions), IN_FLIGHT)]
    if not windows:
        return
    current = lead(windows[0])
    follow(windows[0], *current)
    for w, window in enumerate(windows):
        upcoming = lead(windows[w + 1]) if w + 1 < len(windows) else None
        for q, handle in zip(window, current[0]):
            yield q, handle.result()
        if upcoming is not None:
            follow(windows[w + 1], *upcoming)
            current = upcoming
