"""On-disk caches built once (llava.buildcache): concurrent processes, a builder killed mid-build, and real loaders
(a converted original-format checkpoint; the default model, slow) starting together on an empty cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, original_checkpoint

BUILDER = """
import sys, time
from pathlib import Path
from llava.buildcache import build_once

target, marks, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

def build(tmp):
    (marks / f"build-{__import__('os').getpid()}").write_text("")
    (tmp / "half.bin").write_bytes(b"x")
    time.sleep(seconds)
    (tmp / "weights.bin").write_bytes(b"whole")

print(build_once(target, build))
"""


def start(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_processes_starting_together_build_once(tmp_path):
    target, marks = tmp_path / "cache" / "part", tmp_path / "marks"
    marks.mkdir()
    procs = [start(BUILDER, str(target), str(marks), "0.5") for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert {o.strip() for o, _ in outs} == {str(target)}
    assert len(list(marks.iterdir())) == 1  # one build; the others waited for it
    assert (target / "weights.bin").read_bytes() == b"whole"
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == ["part"]


def test_a_builder_killed_mid_build_leaves_nothing_mistaken_for_finished(tmp_path):
    target, marks = tmp_path / "cache" / "part", tmp_path / "marks"
    marks.mkdir()
    victim = start(BUILDER, str(target), str(marks), "60")
    deadline = time.monotonic() + 60
    while not any(target.parent.glob(".part.tmp-*/half.bin")) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not target.exists()  # the half-written folder never took the final name
    survivor = start(BUILDER, str(target), str(marks), "0")
    out, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, err
    assert (target / "weights.bin").read_bytes() == b"whole"
    assert not list(target.parent.glob(".part.tmp-*"))  # the killed builder's leftovers were removed


LOADER = """
import json, sys
from llava.loading import load_model
lm = load_model(sys.argv[1], template=sys.argv[2] or None, dtype="float32", quantization="none")
print(json.dumps({"path": lm.path, "params": sum(p.numel() for p in lm.model.parameters())}))
"""


def run_loaders(path: str, template: str, cache: Path, n: int = 4, timeout: float = 900) -> list[dict]:
    env = {"LLAVA_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    procs = [start(LOADER, path, template, env=env) for _ in range(n)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]


def test_loaders_of_an_original_checkpoint_starting_together_on_an_empty_cache(tmp_path):
    path, *_ = original_checkpoint(tmp_path)
    results = run_loaders(str(path), "vicuna_v1", tmp_path / "cache")
    assert len({r["path"] for r in results}) == 1 and len({r["params"] for r in results}) == 1
    converted = [p for p in (tmp_path / "cache" / "converted").iterdir() if not p.name.startswith(".")]
    assert len(converted) == 1


@pytest.mark.slow
def test_loaders_of_the_default_model_starting_together_on_an_empty_cache(tmp_path):
    # the bug this guards: the second of two processes failed with "no file named model.safetensors"
    results = run_loaders("default", "", tmp_path / "cache")
    assert len({r["path"] for r in results}) == 1
    built = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "default").iterdir() if not p.name.startswith("."))
    assert built == ["base", "trained"]
