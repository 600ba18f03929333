"""The original LLaVA's evaluation runners (`python -m llava.eval.model_vqa` …) on a tiny random model: the same
files and flags, answers equal to transformers' greedy `generate`, shards, resuming, ScienceQA prompts."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llava.eval import model_vqa, model_vqa_loader, model_vqa_science
from llava.eval.vqa import get_chunk, model_name_from_path
from llava.loading import load_model
from llava.templates import get_template, render, stop_token_ids
from llava.testing import make_tiny_llava

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0), (0, 200, 200)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = make_tiny_llava(root / "tiny-llava")
    images = root / "images"
    images.mkdir()
    rows = []
    for i, c in enumerate(COLORS):
        Image.new("RGB", (24, 20), c).save(images / f"im{i % 3}.png")  # 5 questions over 3 images
        rows.append({"question_id": f"q{i}", "image": f"im{i % 3}.png", "text": f"What color is it? ({i})"})
    qfile = root / "questions.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, images, qfile, rows


def argv(setup, answers, *extra):
    root, model, images, qfile, _ = setup
    return ["--model-path", str(model), "--question-file", str(qfile), "--image-folder", str(images),
            "--answers-file", str(answers), "--conv-mode", "chatml_direct", "--temperature", "0",
            "--max_new_tokens", "6", "--dtype", "float32", "--quantization", "none", *extra]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_model_vqa_answers_equal_greedy_generate(setup):
    root, model, images, _, rows = setup
    answers = root / "out" / "answers.jsonl"
    assert model_vqa.main(argv(setup, answers)) == len(rows)
    got = read(answers)
    assert [a["question_id"] for a in got] == [r["question_id"] for r in rows]
    assert all(set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for a in got)
    assert got[0]["prompt"] == rows[0]["text"] and got[0]["model_id"] == model.name and got[0]["metadata"] == {}
    lm = load_model(str(model), dtype="float32")
    template = get_template("chatml_direct")
    im = lm.process_images([Image.open(images / rows[1]["image"]).convert("RGB")])
    ids = render([{"role": "user", "content": "<image>\n" + rows[1]["text"]}], template, lm.tokenizer,
                 image_token_counts=[im[0].num_tokens], add_generation_prompt=True).input_ids
    with torch.no_grad():
        out = lm.model.generate(input_ids=torch.tensor([ids]), pixel_values=im[0].pixel_values[None],
                                max_new_tokens=6, do_sample=False, eos_token_id=stop_token_ids(template, lm.tokenizer),
                                pad_token_id=lm.tokenizer.pad_token_id)
    text = lm.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert got[1]["text"] == text


def test_shards_concatenate_to_the_whole_run_and_runs_resume(setup):
    root, *_, rows = setup
    whole = root / "whole.jsonl"
    model_vqa_loader.main(argv(setup, whole))
    parts = [root / f"part{k}.jsonl" for k in range(2)]
    for k, part in enumerate(parts):
        model_vqa_loader.main(argv(setup, part, "--num-chunks", "2", "--chunk-idx", str(k)))
    joined = [a for p in parts for a in read(p)]
    assert [(a["question_id"], a["text"]) for a in joined] == [(a["question_id"], a["text"]) for a in read(whole)]
    assert [len(read(p)) for p in parts] == [3, 2]  # the original's ceil-sized chunks
    # a run killed after two answers (the third line torn) continues without duplicates
    lines = whole.read_text().splitlines()
    whole.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:10])
    assert model_vqa_loader.main(argv(setup, whole)) == len(rows) - 2
    again = read(whole)
    assert [a["question_id"] for a in again] == [r["question_id"] for r in rows]
    assert again[:2] == [json.loads(line) for line in lines[:2]]
    assert model_vqa_loader.main(argv(setup, whole)) == 0  # nothing left to do


def test_science_prompts_and_flags(setup):
    root, model, images, *_ = setup
    problems = [
        {"id": "s1", "image": "im0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich is red?\nA. left\nB. right"}, {"from": "gpt", "value": "A"}]},
        {"id": "s2", "conversations": [{"from": "human", "value": "Is water wet?\nA. yes\nB. no"}]},
    ]
    qfile = root / "problems.json"
    qfile.write_text(json.dumps(problems))
    answers = root / "science.jsonl"
    args = argv(setup, answers, "--single-pred-prompt")
    args[args.index("--question-file") + 1] = str(qfile)
    assert model_vqa_science.main(args) == 2
    got = read(answers)
    suffix = "\nAnswer with the option's letter from the given choices directly."
    assert got[0]["prompt"] == "<image>\nWhich is red?\nA. left\nB. right" + suffix
    assert got[1]["prompt"] == "Is water wet?\nA. yes\nB. no" + suffix


def test_unknown_conv_mode_and_beams_are_refused(setup, tmp_path):
    args = argv(setup, tmp_path / "a.jsonl")
    args[args.index("--conv-mode") + 1] = "no_such_mode"
    with pytest.raises(SystemExit, match="valid: .*vicuna_v1"):
        model_vqa.main(args)
    with pytest.raises(SystemExit, match="beam search"):
        model_vqa.main(argv(setup, tmp_path / "a.jsonl", "--num_beams", "3"))


def test_names_and_chunks_like_the_original():
    assert model_name_from_path("/ckpt/llava-v1.5-7b/") == "llava-v1.5-7b"
    assert model_name_from_path("runs/llava-lora/checkpoint-500") == "llava-lora_checkpoint-500"
    assert [get_chunk(list(range(10)), 4, k) for k in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert get_chunk([1, 2], 4, 3) == []
