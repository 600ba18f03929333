"""The shipped default model on easy-VQA (needs the trained pieces in assets/default/; minutes on a CPU), and the
build's time budget."""

from __future__ import annotations

import json

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
