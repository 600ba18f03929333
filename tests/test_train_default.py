"""The shipped default model on easy-VQA (needs the trained pieces in assets/default/; minutes on a CPU)."""

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
