"""The shipped default model on easy-VQA (needs the trained pieces in assets/default/; minutes on a CPU), and the
build's time budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava.default import assets_dir


def test_default_scores_at_least_95_percent_on_300_easyvqa_questions(tmp_path, capsys):
    from train.evaluate import main

    if not (assets_dir() / "adapter" / "adapter_config.json").is_file():
        pytest.fail("assets/default has no trained adapter: run `python -m train.build_default`")
    main(["--model-path", "default", "--benchmark", "easyvqa", "--limit", "300", "--out-dir", str(tmp_path),
          "--no-progress", "--quantization", "auto"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 300
    assert summary["accuracy"] >= 0.95, summary
    assert summary["yes_no_f1"] >= 0.95, summary


def test_build_minutes_leave_the_scenes_stage_what_is_left_after_the_evaluation_reserve():
    from train.build_default import parse_args, scenes_budget

    args = parse_args(["--recipe", "scenes", "--build-minutes", "120", "--eval-limit", "1000"])
    assert scenes_budget(args, elapsed=62.0) == pytest.approx(120 - 62 - 4)  # reserve 3 + 1 per 1,000 questions
    assert scenes_budget(parse_args(["--recipe", "scenes", "--build-minutes", "120", "--max-minutes", "30"]), 62.0) == 30
    assert scenes_budget(parse_args(["--recipe", "scenes", "--max-minutes", "30"]), 500.0) == 30
    with pytest.raises(SystemExit, match="--eval-reserve"):
        scenes_budget(parse_args(["--recipe", "scenes", "--build-minutes", "120", "--eval-reserve", "10"]), 109.5)


def test_scenes_mix_takes_easyvqa_images_the_rebuilt_init_never_saw_as_independent_turns(tmp_path, monkeypatch):
    from train import build_default, easyvqa
    from train.build_default import INIT_STAGE2_ROWS, parse_args, scenes_data, scenes_init

    data = tmp_path / "scenes" / "data"
    data.mkdir(parents=True)
    (data / "meta.json").write_text("{}")  # the generated set exists: scenes_data only writes the mix
    scene_row = {"id": "s0", "image": "images/s0.png", "family": "count", "kind": "count/all",
                 "conversations": [{"from": "human", "value": "<image>\nHow many shapes are there?"},
                                   {"from": "gpt", "value": "3"}]}
    (data / "train.json").write_text(json.dumps([scene_row]))
    text = [{"id": "text-0", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]
    (tmp_path / "text-rows.json").write_text(json.dumps(text))
    args = parse_args(["--recipe", "scenes", "--runs", str(tmp_path), "--scenes-init", "rebuild", "--scenes-questions", "0",
                       "--easyvqa-branches", "3", "--init-stage2b-rows", "0", "--text-repeat", "1"])
    mix, _ = scenes_data(args, build_default.default_spec([6, -2]), tmp_path / "scenes", tmp_path / "base")
    rows = json.loads(mix.read_text())
    expected = easyvqa.dialogues("train", instruction_every_turn=True)[INIT_STAGE2_ROWS:INIT_STAGE2_ROWS + 3]
    assert rows == [scene_row] + expected + text
    questions = [t["value"] for t in expected[0]["conversations"][0::2]]
    assert all(q.endswith(easyvqa.prompt("")) for q in questions), questions  # every turn stands alone

    built = []
    monkeypatch.setattr(build_default, "build_easyvqa", lambda a: built.append(a))
    assert scenes_init(args) == tmp_path / "default" / "stage2"
    assert built[0].stage2b_rows == 0 and built[0].stage2_rows == INIT_STAGE2_ROWS
    assert scenes_init(parse_args(["--recipe", "scenes", "--runs", str(tmp_path), "--scenes-init", "rebuild"])) \
        == tmp_path / "default" / "stage2b"


def test_scenes_model_card_lists_every_family_the_recipe_and_tokens_per_image():
    from train.build_default import default_spec, scenes_card
    from train.scenes import FAMILIES

    families = {f: {"n": 10, "score": 0.5 + i / 100} for i, f in enumerate(FAMILIES)}
    report = {"init": "assets/default", "lora": {"r": 8, "alpha": 16}, "scenes_questions": 6, "scenes_relations": 2,
              "scenes_halves": 3, "projector": "mlp2x_gelu_rowcol", "image_tokens": 128,
              "stage": {"rows": 9000, "global_step": 300, "train_seconds": 6000.0, "seconds_per_step": 20.0,
                        "final_loss": 0.6, "tokens_per_step": 2712.4, "image_tokens_per_step": 1180.0,
                        "label_tokens_per_step": 126.7, "padding_share": 0.091},
              "test": {"overall": 0.55, "families": {**families, "relation": {"n": 10, "score": 0.5, "answered_yes": 0.84}}},
              "halves": {"kinds": {"halves/x": {"n": 113, "score": 0.69}, "halves/y": {"n": 127, "score": 0.8425}}},
              "warmup": {"global_step": 61, "train_seconds": 600.0, "final_loss": 0.41}, "scenes_reword": 0.5,
              "paraphrase": {"overall": 0.45, "families": {f: v for f, v in families.items() if f != "easyvqa"}},
              "easyvqa": {"accuracy": 0.93, "n": 1000},
              "chat": [{"prompt": "Hi?", "reply": "Hello there, how can I help you today?", "words": 8}]}
    card = scenes_card(default_spec([6, -2], "mlp2x_gelu_rowcol"), report)
    assert "128 tokens per image (projector `mlp2x_gelu_rowcol`; the patch grid read by rows, then by columns)" in card
    assert "2 more relation and 3 which-half questions per scene; 50% of the questions in other words" in card
    assert "a relation warm-up (train.scenes.where_rows: relation and which-half questions only): 61 steps, 10.0 min" in card
    assert "(20.0 s/step; 2,712 tokens/step (1,180 image, 127 answer, 9% padding))" in card
    for f in FAMILIES:
        assert f"| {f} | 10 |" in card
    assert "| easyvqa | 10 | 0.570 | nan |" in card and "easy-VQA test 0.9300 (n 1000)" in card
    assert "Yes/no families, share answered yes: relation 84%." in card
    assert "left/right 0.690 (n 113), top/bottom 0.843 (n 127)" in card


def test_which_half_diagnostic_asks_the_test_scenes_with_their_images(tmp_path, monkeypatch):
    """build_default's evaluation asks one which-half question per test scene; the images resolve in data/."""
    from train import build_default, scenes

    scenes.generate(tmp_path / "data", seed=3, n_train=10, n_test=40, image_size=56)
    calls = []
    monkeypatch.setattr(build_default, "evaluate_rows", lambda *a, **k: calls.append((a, k)) or {"kinds": {}})
    assert build_default.evaluate_halves(tmp_path / "model", tmp_path) == {"kinds": {}}
    ((model, rows, out), kw), = calls
    assert model == tmp_path / "model" and out == tmp_path / "eval-halves" and kw["image_folder"] == tmp_path / "data"
    asked = json.loads(rows.read_text())
    assert asked and all((tmp_path / "data" / r["image"]).is_file() and r["family"] == "halves" for r in asked)


def test_relation_warmup_trains_first_and_the_mix_continues_from_it_in_the_time_left(tmp_path, monkeypatch):
    """--scenes-warmup-minutes: a stage on train.scenes.where_rows from the init, then the mix from that stage, its
    budget what the warm-up left; the report and card say so."""
    from train import build_default, scenes

    root = tmp_path / "scenes"
    scenes.generate(root / "data", seed=3, n_train=40, n_test=10, image_size=56)
    (root / "base").mkdir(parents=True)
    (root / "base" / "config.json").write_text(json.dumps({"image_seq_length": 128}))
    (tmp_path / "text-rows.json").write_text(json.dumps([]))
    init = tmp_path / "init"
    init.mkdir()
    calls = []

    def fake_run(cfg):
        calls.append(cfg)
        return {"rows": 1, "final_loss": 0.5, "train_seconds": 540.0, "cache_fill_seconds": 60.0,
                "seconds_per_step": 9.0, "global_step": 60}

    monkeypatch.setattr(build_default, "run", fake_run)
    args = build_default.parse_args(["--recipe", "scenes", "--runs", str(tmp_path), "--scenes-init", str(init),
                                     "--max-minutes", "30", "--scenes-warmup-minutes", "10", "--skip-eval",
                                     "--scenes-questions", "2"])
    assert build_default.build_scenes(args) == 0
    warm, mix = calls
    assert warm.init_from == str(init) and warm.max_minutes == 10 and warm.output_dir == str(root / "stage-where")
    rows = json.loads(Path(warm.data).read_text())
    assert rows and all(r["id"].startswith("where-") for r in rows)
    assert mix.init_from == str(root / "stage-where") and mix.max_minutes == pytest.approx(30 - 10)
    assert mix.output_dir == str(root / "stage-scenes")
    with pytest.raises(SystemExit, match="leaves the mix no time"):
        build_default.build_scenes(build_default.parse_args(
            ["--recipe", "scenes", "--runs", str(tmp_path), "--scenes-init", str(init), "--max-minutes", "10",
             "--scenes-warmup-minutes", "10", "--skip-eval"]))
