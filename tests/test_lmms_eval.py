"""lmms-eval plugin (llava.eval.lmms_eval_plugin) on a tiny random model: registered through LMMS_EVAL_PLUGINS and
the entry-point payload, generate_until equal to transformers' greedy generate, loglikelihood equal to a direct
forward (as the mean negative log-likelihood, lmms-eval's convention), and the local easy-VQA tasks found and run
by lmms-eval's own evaluator. Skipped without lmms-eval (the
`eval` extra; `make test` never installs it)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402

from llava.loading import load_model  # noqa: E402
from llava.templates import render, stop_token_ids  # noqa: E402
from llava.testing import make_tiny_llava  # noqa: E402

PLUGIN = "llava.eval.lmms_eval_plugin"
TASKS = Path(importlib.import_module(PLUGIN).__file__).parent / "tasks"
IMAGES = [Image.new("RGB", (20, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
DOCS = [{"question": "What color is it?", "answer": "red"}, {"question": "Is it blue?", "answer": "yes"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from llava.eval.lmms_eval_plugin.models.llava_engine import LlavaEngine

    path = make_tiny_llava(tmp_path_factory.mktemp("lmms") / "tiny")
    lm = load_model(str(path), dtype="float32")
    m = LlavaEngine(str(path), loaded=lm, max_new_tokens=6)
    m.task_dict = {"t": {"test": DOCS}}
    yield m
    m.clean()


def visual(doc):
    return [IMAGES[DOCS.index(doc)]]


def req(kind, args, idx=0):
    return Instance(kind, args, idx=idx, metadata={"task": "t", "doc_id": args[3], "repeats": 1})


def test_registered_through_plugins_and_entry_point(monkeypatch):
    from lmms_eval import models
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from llava.eval.lmms_eval_plugin import manifests
    from llava.eval.lmms_eval_plugin.models.llava_engine import LlavaEngine

    monkeypatch.setenv("LMMS_EVAL_PLUGINS", PLUGIN)
    registry = ModelRegistryV2()
    models._merge_legacy_plugin_models(registry)
    assert registry.get_model_class("llava_engine") is LlavaEngine
    registry = ModelRegistryV2()
    for manifest in registry._coerce_payload_to_manifests(manifests):
        registry.register_manifest(manifest)
    assert registry.get_model_class("llava_engine") is LlavaEngine


def test_generate_until_is_greedy_generate(model):
    reqs = [req("generate_until", (d["question"], {"until": ["\n\n"], "max_new_tokens": 6, "temperature": 0},
                                   visual, i, "t", "test")) for i, d in enumerate(DOCS)]
    got = model.generate_until(reqs)
    lm = model.lm
    for i, doc in enumerate(DOCS):
        im = lm.process_images([IMAGES[i]])
        ids = render([{"role": "user", "content": "<image>\n" + doc["question"]}], lm.template, lm.tokenizer,
                     image_token_counts=[im[0].num_tokens], add_generation_prompt=True).input_ids
        with torch.no_grad():
            out = lm.model.generate(input_ids=torch.tensor([ids]), pixel_values=im[0].pixel_values[None],
                                    max_new_tokens=6, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                                    eos_token_id=stop_token_ids(lm.template, lm.tokenizer))
        want = lm.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        assert got[i] == want.split("\n\n")[0].strip()


def test_loglikelihood_is_the_continuation_loss(model, monkeypatch):
    choices = ["red", "blue green"]
    reqs = [req("loglikelihood", (DOCS[0]["question"], c, visual, 0, "t", "test"), j) for j, c in enumerate(choices)]
    got = [unwrap_generation_output(r)[0] for r in model.loglikelihood(reqs)]  # as lmms-eval's evaluator reads them
    lm = model.lm
    im = lm.process_images([IMAGES[0]])
    ctx = render([{"role": "user", "content": "<image>\n" + DOCS[0]["question"]}], lm.template, lm.tokenizer,
                 image_token_counts=[im[0].num_tokens], add_generation_prompt=True).input_ids
    for (loss, greedy), c in zip(got, choices):
        cont = lm.tokenizer(c, add_special_tokens=False).input_ids
        with torch.no_grad():  # one row, no padding
            logits = lm.model(input_ids=torch.tensor([ctx + cont]), pixel_values=im[0].pixel_values[None]).logits
        lp = torch.log_softmax(logits[0, len(ctx) - 1:-1].float(), -1)
        want = -sum(float(lp[i, t]) for i, t in enumerate(cont)) / len(cont)  # the loss, as lmms-eval's models
        assert loss == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(lp[i].argmax()) == t for i, t in enumerate(cont))
    # a continuation made of the argmax token is greedy (whichever token of the vocabulary it is)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ctx]), pixel_values=im[0].pixel_values[None]).logits
    best = int(logits[0, -1].argmax())
    monkeypatch.setattr(model, "_continuation_ids", lambda text: [best])
    (reply,) = model.loglikelihood([req("loglikelihood", (DOCS[0]["question"], "*", visual, 0, "t", "test"))])
    loss, greedy = unwrap_generation_output(reply)[0]
    assert greedy and loss == pytest.approx(-float(torch.log_softmax(logits[0, -1].float(), -1)[best]), abs=1e-4)


@pytest.mark.slow  # lmms-eval indexes its ~1,000 task files first (~60 s here)
def test_local_easyvqa_tasks_run_in_lmms_eval(model, monkeypatch):
    pytest.importorskip("easy_vqa")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS))
    assert {"easyvqa_local", "easyvqa_local_yesno"} <= set(tm.all_tasks)
    out = evaluator.simple_evaluate(model=model, tasks=["easyvqa_local", "easyvqa_local_yesno"], limit=3,
                                    task_manager=tm, device="cpu", log_samples=True)
    res = out["results"]
    assert 0.0 <= res["easyvqa_local"]["exact_match,none"] <= 1.0
    assert 0.0 <= res["easyvqa_local_yesno"]["acc,none"] <= 1.0
    # lmms-eval picks the choice of least loss: the likelier choice of each question must be its prediction
    (sample,) = [s for s in out["samples"]["easyvqa_local_yesno"] if s["doc_id"] == 0]
    losses = [float(r[0]) for r in sample["filtered_resps"]]
    assert sample["acc"] == float(losses.index(min(losses)) == int(sample["target"]))
