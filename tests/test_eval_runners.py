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


# ------------------------------------------------------------------------------------------------ scorers


def test_pope_rule_and_scores_worked_by_hand(tmp_path):
    from llava.eval import eval_pope
    from llava.eval.scoring import pope_says_no

    assert pope_says_no("No, there is no dog.") and pope_says_no("There is not a cat. Yes.")
    assert not pope_says_no("Yes. No doubt about it.")  # only the first sentence counts
    assert not pope_says_no("Nope") and not pope_says_no("Notably yes")  # whole words only
    assert pope_says_no("no")
    # category "random": answers yes, yes, no, yes, no vs labels yes, no, no, yes, yes
    #   -> TP 2 (1, 4), FP 1 (2), TN 1 (3), FN 1 (5): accuracy 3/5, precision 2/3, recall 2/3, F1 2/3, yes 3/5
    texts = ["Yes, there is.", "Yes", "No.", "yes it is", "There is not."]
    labels = ["yes", "no", "no", "yes", "yes"]
    questions = [{"question_id": i, "category": "random"} for i in range(5)]
    questions.append({"question_id": 9, "category": "adversarial"})
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "coco_pope_random.json").write_text("".join(json.dumps({"label": x}) + "\n" for x in labels))
    (tmp_path / "ann" / "coco_pope_adversarial.json").write_text(json.dumps({"label": "no"}) + "\n")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = [{"question_id": i, "text": t} for i, t in enumerate(texts)] + [{"question_id": 9, "text": "No"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    out = eval_pope.main(["--annotation-dir", str(tmp_path / "ann"), "--question-file", str(tmp_path / "q.jsonl"),
                          "--result-file", str(tmp_path / "a.jsonl")])
    r = out["random"]
    assert (r["TP"], r["FP"], r["TN"], r["FN"]) == (2, 1, 1, 1)
    assert r["accuracy"] == pytest.approx(0.6) and r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 3) and r["f1"] == pytest.approx(2 / 3) and r["yes_ratio"] == 0.6
    a = out["adversarial"]
    assert (a["TN"], a["accuracy"], a["precision"], a["yes_ratio"]) == (1, 1.0, 0.0, 0.0)


def test_science_qa_rule_and_accuracy_worked_by_hand(tmp_path):
    from llava.eval import eval_science_qa
    from llava.eval.scoring import science_answer

    assert science_answer("B") == "B" and science_answer("C. a cat") == "C"
    assert science_answer("I think so.\nThe answer is A.") == "A" and science_answer("The answer is D") == "D"
    assert science_answer("b") == "FAILED" and science_answer("Answer: B") == "FAILED"
    assert science_answer("E", ("A", "B")) == "FAILED"  # not one of this problem's options
    problems = {"1": {"choices": ["x", "y"], "answer": 1}, "2": {"choices": ["x", "y", "z"], "answer": 0},
                "3": {"choices": ["x", "y"], "answer": 0}, "4": {"choices": ["x", "y"], "answer": 1}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4"]}))
    # 1: right with image; 2: right, text only; 3: wrong with image; 4: missing -> FAILED (text only)
    preds = [{"question_id": "1", "prompt": "<image>\nQ", "text": "B"},
             {"question_id": "2", "prompt": "Q", "text": "The answer is A."},
             {"question_id": "3", "prompt": "<image>\nQ", "text": "B. y"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    out = eval_science_qa.main(["--base-dir", str(tmp_path), "--result-file", str(tmp_path / "r.jsonl"),
                                "--output-file", str(tmp_path / "o.json"), "--output-result", str(tmp_path / "s.json")])
    assert out == {"acc": 50.0, "img_acc": 50.0, "correct": 2, "count": 4}
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["results"] == {"1": 1, "2": 0, "3": 1, "4": -1} and saved["acc"] == 50.0


def test_questions_about_one_image_start_from_the_first_ones_prompt(setup, tmp_path, monkeypatch):
    """The first question about an image goes first; the image's other questions reuse its computed prompt
    (system turn + image tokens) from the engine's prefix cache, and the answers are the same as without reuse."""
    from llava.engine import Engine

    handles = []
    submit = Engine.submit
    monkeypatch.setattr(Engine, "submit", lambda self, req: handles.append(submit(self, req)) or handles[-1])
    answers = tmp_path / "a.jsonl"
    model_vqa_loader.main(argv(setup, answers))
    results = {r.request_id: r for r in (h.result() for h in handles)}
    assert len(results) == 5
    # submission order: the leaders of im0, im1, im2 (q0, q1, q2), then q3 (im0) and q4 (im1) from their prompts,
    # past the image (a leader can at most reuse the system turn before its image)
    cached = [r.cached_tokens for r in results.values()]
    assert min(cached[3:]) > max(cached[:3]) and min(cached[3:]) >= 16
    alone = tmp_path / "alone"
    alone.mkdir()
    for i, row in enumerate(setup[4]):  # each question in a run of its own: no reuse possible
        q = alone / f"q{i}.jsonl"
        q.write_text(json.dumps(row) + "\n")
        args = argv(setup, alone / f"a{i}.jsonl")
        args[args.index("--question-file") + 1] = str(q)
        model_vqa_loader.main(args)
    assert [a["text"] for a in read(answers)] == [read(alone / f"a{i}.jsonl")[0]["text"] for i in range(5)]
