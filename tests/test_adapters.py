"""Several LoRA adapters on one base in one running batch (llava.adapters + the engine): each request's greedy output
equals its adapter merged into the base and served alone; errors name their cause."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from llava.adapters import AdapterError, read_adapter
from llava.engine import Engine, GenerationRequest, SamplingParams, UnknownAdapterError
from llava.images import ProcessedImage
from llava.testing import make_tiny_tokenizer

IMAGE_SIZE, PATCH = 32, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
LLM = r".*model\.language_model\..*\.({})"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _model(tok, hidden=64, seed=0):
    torch.manual_seed(seed)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.image_token_id,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return _model(tok)


# (name, rank, alpha, targets, rsLoRA): different ranks, scalings and target sets side by side
ADAPTERS = [
    ("qv", 4, 8, "q_proj|v_proj", False),
    ("all", 8, 16, "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj", False),
    ("mlp", 2, 4, "gate_proj|up_proj|down_proj", True),
]


def _make_adapter(model, out, seed: int, r: int, alpha: int, targets: str, rslora: bool = False):
    """A PEFT adapter with random (non-zero) A and B, saved as PEFT saves it; returns the PeftModel."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=LLM.format(targets), init_lora_weights=False,
                        use_rslora=rslora)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():  # make the adapters matter: PEFT's random init of B is small
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(out)
    return peft_model


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    """name -> (folder, the base with that adapter merged)."""
    out = {}
    for i, (name, r, alpha, targets, rslora) in enumerate(ADAPTERS):
        folder = tmp_path_factory.mktemp(f"lora-{name}")
        peft_model = _make_adapter(model, folder, 100 + i, r, alpha, targets, rslora)
        out[name] = (folder, peft_model.merge_and_unload().eval())
    return out


def _image(seed: int) -> ProcessedImage:
    g = torch.Generator().manual_seed(seed)
    return ProcessedImage(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g), (IMAGE_SIZE, IMAGE_SIZE),
                          IMAGE_TOKENS, f"img{seed}")


def _prompts(tok):
    shared = tok.encode("USER: a long shared system preamble that every request starts with, ")
    return [
        (shared + tok.encode("hello there ASSISTANT:"), []),
        (shared + [tok.image_token_id] * IMAGE_TOKENS + tok.encode(" what is this ASSISTANT:"), [_image(1)]),
    ]


def _engine(model, tok, **kw) -> Engine:
    return Engine(model, tok, eos_token_ids=[tok.eos_token_id], runner="llama", **kw)


def _greedy(n=12) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def _solo(model, tok, ids, images) -> list[int]:
    eng = _engine(model, tok, max_batch_size=1, prefix_cache_tokens=0, image_cache_bytes=0)
    h = eng.submit(GenerationRequest(list(ids), list(images), _greedy()))
    eng.run_until_idle()
    return h.result().token_ids


@pytest.mark.parametrize("path", ["fused-kernels", "torch-ops"])
def test_mixed_adapters_in_one_batch_equal_each_merged_alone(model, tok, adapters, path, monkeypatch):
    from llava import kernels

    if path == "torch-ops":
        monkeypatch.setattr(kernels, "available", lambda: False)
    elif not kernels.available():
        pytest.skip("the CPU kernels are not built on this machine")
    eng = _engine(model, tok, max_batch_size=16)
    assert eng._runner.fused == (path == "fused-kernels")
    for name, (folder, _) in adapters.items():
        eng.load_adapter(read_adapter(folder, model, name))
    assert eng.adapter_names == [name for name, *_ in ADAPTERS]
    seen_steps = []
    decode = eng._runner.decode

    def spy(keys, tokens):
        seen_steps.append({k.request.adapter for k in keys})
        return decode(keys, tokens)

    eng._runner.decode = spy
    handles = []
    # twice over: the second round meets the first round's prefixes in the prefix cache (kept per adapter)
    for round_ in range(2):
        for ids, images in _prompts(tok):
            for name in [None, *adapters]:
                handles.append((name, ids, images, eng.submit(GenerationRequest(ids, images, _greedy(), adapter=name))))
        eng.run_until_idle()
    assert max(len(s) for s in seen_steps) == 4, "requests of all adapters and the base decoded in one step"
    assert eng.stats().prefix_cache.hits > 0
    by_adapter = {}
    for name, ids, images, h in handles:
        want = _solo(adapters[name][1] if name else model, tok, ids, images)
        got = h.result().token_ids
        assert got == want, f"adapter {name}"
        by_adapter.setdefault(tuple(ids), {})[name] = got
    for outputs in by_adapter.values():  # the adapters change the output, so the equality above means something
        assert len({tuple(v) for v in outputs.values()}) == len(outputs)


def test_unload_lets_running_requests_finish_and_refuses_new_ones(model, tok, adapters):
    eng = _engine(model, tok, max_batch_size=4)
    folder, merged = adapters["all"]
    eng.load_adapter(read_adapter(folder, model, "all"))
    ids, images = _prompts(tok)[0]
    h = eng.submit(GenerationRequest(ids, images, _greedy(), adapter="all"))
    eng.step()
    eng.step()
    assert eng.unload_adapter("all") and not eng.unload_adapter("all")
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'all'"):
        eng.submit(GenerationRequest(ids, images, _greedy(), adapter="all"))
    eng.run_until_idle()
    assert h.result().token_ids == _solo(merged, tok, ids, images)
    eng.step()
    assert eng._runner.adapters == []  # its weights left with its last request


def test_adapter_errors_name_the_cause(model, tok, tmp_path):
    eng = _engine(model, tok)
    with pytest.raises(UnknownAdapterError, match=r"unknown adapter 'nope'; loaded: \[\]"):
        eng.submit(GenerationRequest(tok.encode("hi"), [], _greedy(), adapter="nope"))
    with pytest.raises(AdapterError, match="not a LoRA adapter folder"):
        read_adapter(tmp_path, model, "x")
    # LoRA on the vision tower cannot be switched per request
    torch.manual_seed(0)
    vision = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=r".*vision_tower.*\.q_proj"))
    vision.save_pretrained(tmp_path / "vision")
    with pytest.raises(AdapterError, match="vision_tower.*only those can be switched"):
        read_adapter(tmp_path / "vision", model, "v")
    # trained on another base: shapes do not fit
    other = _model(tok, hidden=32)
    _make_adapter(other, tmp_path / "other", 1, 2, 4, "q_proj")
    with pytest.raises(AdapterError, match="do not fit the base's 64 -> 64 projection"):
        read_adapter(tmp_path / "other", model, "o")
    # DoRA changes the weight norm: not an additive product
    _make_adapter(model, tmp_path / "dora", 1, 2, 4, "q_proj")
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        read_adapter(tmp_path / "dora", model, "d")
    # an adapter trained together with the projector (train.train's projector.safetensors) changes image features
    run = tmp_path / "run"
    _make_adapter(model, run / "adapter", 1, 2, 4, "q_proj")
    proj = {f"multi_modal_projector.{k}": v + 1 for k, v in model.model.multi_modal_projector.state_dict().items()}
    save_file(proj, run / "projector.safetensors")
    with pytest.raises(AdapterError, match="its own projector"):
        read_adapter(run, model, "p")
    save_file({k: v - 1 for k, v in proj.items()}, run / "projector.safetensors")  # the base's own: fine
    assert read_adapter(run, model, "p").targets == ["q_proj"]


def test_peft_reference_matches_merged(model, tok, adapters):
    """The merged reference itself is PEFT's: the unmerged PeftModel gives the same greedy tokens."""
    folder, merged = adapters["qv"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    ids, images = _prompts(tok)[0]
    with torch.no_grad():
        ref = peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12,
                                  do_sample=False, pad_token_id=tok.pad_token_id)
    assert ref[0, len(ids):].tolist() == _solo(merged, tok, ids, images)
