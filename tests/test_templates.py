"""llava.templates: exact template strings, Jinja export == Python renderer, labels exactly on assistant replies
(byte-level BPE and sentencepiece-style Metaspace tokenizers), image expansion and the errors."""

from __future__ import annotations

import string
from types import SimpleNamespace

import jinja2
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llava.templates import (
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    ImageCountError,
    Rendered,
    Template,
    TemplateError,
    TokenizerError,
    get_template,
    normalize_messages,
    register_template,
    render,
    render_text,
    stop_token_ids,
    to_jinja,
)
from llava.testing import SPECIAL_TOKENS, make_tiny_tokenizer

ALL_NAMES = ["vicuna_v1", "llava_v1", "llava_llama_2", "mistral_instruct", "chatml_direct", "llama3", "plain"]


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def sp_tok():
    """Sentencepiece-like: a Metaspace pre-tokenizer glues "▁" to the next word, as Llama-2/Mistral do."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", *SPECIAL_TOKENS],
        initial_alphabet=[*string.printable, "▁"], show_progress=False,
    )
    tk.train_from_iterator(_training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def _training_text() -> list[str]:
    """Every template's rendering of the test conversations, so merges like "▁ASSISTANT:" exist, as in real vocabs."""
    return [render_text(msgs, name, add_generation_prompt=gen) for name, msgs, gen in (c.values for c in CASES)]


def _img_parts(text, n=1):
    return [{"type": "image"}] * n + [{"type": "text", "text": text}]


# (name, messages, add_generation_prompt); messages use role/content so HF's apply_chat_template can take them.
CONVERSATIONS = [
    ("single", [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "A cat."}], False),
    ("prompt_1img", [{"role": "user", "content": "<image>\nWhat color is the circle?"}], True),
    ("multi_2img", [
        {"role": "user", "content": _img_parts("Describe the shape.")},
        {"role": "assistant", "content": "It is a red triangle."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                                     {"type": "text", "text": "And this one?"}]},
        {"role": "assistant", "content": "A blue rectangle, on a gray picture."},
    ], False),
    ("system_multi_prompt", [
        {"role": "system", "content": "You are a \"terse\" {{ bot }} {% raw %} \\ é\nline two."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "  Hello! how are you today?\n"},
        {"role": "user", "content": _img_parts("yes or no?", n=2)},
    ], True),
    ("system_ends_assistant", [
        {"role": "system", "content": [{"type": "text", "text": "Answer with a single word."}]},
        {"role": "user", "content": "<image>\nIs there a circle?"},
        {"role": "assistant", "content": "(yes) 42"},
    ], False),
    ("empty_system", [
        {"role": "system", "content": ""},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "no"},
    ], False),
]
CASES = [
    pytest.param(name, msgs, gen, id=f"{name}-{cid}")
    for name in ALL_NAMES
    for cid, msgs, gen in CONVERSATIONS
    if not (name == "plain" and msgs[0]["role"] == "system")
]


def _expected_replies(t: Template, messages) -> list[str]:
    return [t.reply_lead + m["content"] + t.assistant_suffix for m in normalize_messages(messages)
            if m["role"] == "assistant"]


def _label_runs(r: Rendered) -> list[list[int]]:
    """Contiguous runs of labelled token ids (one run per assistant reply)."""
    runs, current = [], []
    for tid, lab in zip(r.input_ids, r.labels):
        if lab != -100:
            assert lab == tid  # a label is the token itself (causal LM shift happens in the model)
            current.append(lab)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_registry_has_exact_names():
    assert set(ALL_NAMES) <= set(TEMPLATES)
    assert get_template("chatml_direct").system == "Answer the questions."
    assert "curious user" in get_template("vicuna_v1").system and "curious human" in get_template("llava_v1").system
    with pytest.raises(TypeError):
        TEMPLATES["new"] = get_template("plain")  # read-only view


def test_unknown_template_lists_valid_names(tok):
    with pytest.raises(TemplateError) as err:
        render([{"role": "user", "content": "hi"}], "vicuna", tok)
    assert "'vicuna'" in str(err.value)
    for name in ALL_NAMES:
        assert name in str(err.value)


def test_duplicate_registration_is_an_error():
    with pytest.raises(TemplateError, match="already registered"):
        register_template(Template("llama3"))
    assert TEMPLATES["llama3"].bos == "<|begin_of_text|>"  # the original stays


@pytest.mark.parametrize("name,messages,expected", [
    ("vicuna_v1", CONVERSATIONS[2][1][:2] + [{"role": "user", "content": "ok"}],
     "<s>" + get_template("vicuna_v1").system + " USER: <image>\nDescribe the shape. ASSISTANT: It is a red "
     "triangle.</s>USER: ok ASSISTANT:"),
    ("llava_llama_2", [{"role": "system", "content": "S"}, *CONVERSATIONS[0][1], {"role": "user", "content": "ok"}],
     "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nWhat is this? [/INST] A cat. </s><s>[INST] ok [/INST]"),
    ("mistral_instruct", CONVERSATIONS[0][1] + [{"role": "user", "content": "ok"}],
     "<s>[INST] What is this? [/INST] A cat. </s>[INST] ok [/INST]"),
    ("chatml_direct", CONVERSATIONS[1][1],
     "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat color is the circle?"
     "<|im_end|><|im_start|>assistant\n"),
    ("llama3", [{"role": "system", "content": "S"}, *CONVERSATIONS[0][1], {"role": "user", "content": "ok"}],
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user"
     "<|end_header_id|>\n\nWhat is this?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nok<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("plain", [{"from": "human", "value": "<image>\nDescribe briefly."}, {"from": "gpt", "value": "a red circle"}],
     "<image>a red circle\n"),
])
def test_exact_reference_strings(name, messages, expected):
    gen = normalize_messages(messages)[-1]["role"] == "user"
    assert render_text(messages, name, add_generation_prompt=gen) == expected


@pytest.mark.parametrize("name,messages,gen", CASES)
def test_jinja_export_matches_render(tok, name, messages, gen):
    r = render(messages, name, tok, add_generation_prompt=gen)
    jinja = to_jinja(name)
    text = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=gen)
    assert text == r.text
    ids = tok.apply_chat_template(messages, chat_template=jinja, add_generation_prompt=gen, return_dict=False)
    assert ids == r.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert r.num_images == text.count(IMAGE_PLACEHOLDER) == ids.count(tok.image_token_id)


@pytest.mark.parametrize("name,messages,gen", CASES)
def test_labels_are_exactly_the_replies_bytelevel(tok, name, messages, gen):
    t = get_template(name)
    r = render(messages, t, tok, add_generation_prompt=gen)
    decoded = [tok.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
               for run in _label_runs(r)]
    assert decoded == _expected_replies(t, messages)
    if gen:
        assert r.text.endswith(t.assistant_prefix) and r.labels[-1] == -100


@pytest.mark.parametrize("name,messages,gen", CASES)
def test_labels_are_exactly_the_replies_metaspace(sp_tok, name, messages, gen):
    t = get_template(name)
    r = render(messages, t, sp_tok, add_generation_prompt=gen)
    # Join the pieces rather than decode(): the Metaspace decoder drops a leading "▁" we want to see.
    pieces = ["".join(sp_tok.convert_ids_to_tokens(run)).replace("▁", " ") for run in _label_runs(r)]
    expected = _expected_replies(t, messages)
    if expected and r.text.startswith(expected[0]):  # `plain` without an image: the dummy "▁" prefix at char 0
        expected[0] = " " + expected[0]
    assert pieces == expected


def test_reply_lead_is_a_token_boundary(tok, sp_tok):
    """The ' ' after 'ASSISTANT:' starts the first reply token in both tokenizer families, so nothing is lost."""
    msgs = CONVERSATIONS[0][1]
    for tk in (tok, sp_tok):
        r = render(msgs, "vicuna_v1", tk)
        first = r.labels.index(next(lab for lab in r.labels if lab != -100))
        assert tk.convert_ids_to_tokens(r.input_ids[first])[0] in " Ġ▁"
        assert tk.convert_ids_to_tokens(r.input_ids[first - 1]).endswith(":")


def test_llava_data_format_and_parts_normalize():
    data = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]
    assert normalize_messages(data) == [{"role": "user", "content": "<image>\nQ?"},
                                        {"role": "assistant", "content": "A."}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                          {"type": "image_url", "image_url": {"url": "data:,"}}]}]
    assert normalize_messages(parts)[0]["content"] == "Compare\n<image>\n<image>"


@pytest.mark.parametrize("messages,match", [
    ([], "at least one user"),
    ([{"role": "system", "content": "s"}], "at least one user"),
    ([{"role": "assistant", "content": "a"}], "message 0 has role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "message 1 has role 'system'"),
    ([{"role": "tool", "content": "a"}], "unknown role 'tool'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "neither text nor image"),
    ([{"role": "user", "content": None}], "must be a string or a list"),
])
def test_bad_conversations_raise(messages, match):
    with pytest.raises(TemplateError, match=match):
        normalize_messages(messages)


def test_generation_prompt_needs_a_user_last(tok):
    with pytest.raises(TemplateError, match="last message"):
        render(CONVERSATIONS[0][1], "llama3", tok, add_generation_prompt=True)


def test_system_message_overrides_default():
    t = get_template("vicuna_v1")
    text = render_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], t,
                       add_generation_prompt=True)
    assert text == "<s>Be brief. USER: hi ASSISTANT:"
    assert t.system not in text
    assert render_text(CONVERSATIONS[5][1], "chatml_direct") == (
        "<|im_start|>user\nhi<|im_end|><|im_start|>assistant\nno<|im_end|>")


def test_plain_rejects_system_in_python_and_jinja(tok):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "<image>"}]
    with pytest.raises(TemplateError, match="no system prompt"):
        render_text(msgs, "plain")
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system prompt"):
        tok.apply_chat_template(msgs, chat_template=to_jinja("plain"), tokenize=False)


def test_plain_labels_caption_only(tok):
    r = render([{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a red circle"}],
               "plain", tok, image_token_counts=[4])
    assert r.input_ids[:4] == [tok.image_token_id] * 4 and r.labels[:4] == [-100] * 4
    assert r.labels[4:] == r.input_ids[4:]  # everything after the image is the caption + "\n"
    assert tok.decode(r.labels[4:]) == "a red circle\n"


def test_image_expansion(tok):
    msgs = CONVERSATIONS[2][1]
    base = render(msgs, "chatml_direct", tok)
    r = render(msgs, "chatml_direct", tok, image_token_counts=[3, 5])
    img = tok.image_token_id
    assert base.input_ids.count(img) == 2 and r.input_ids.count(img) == 8
    assert len(r.input_ids) == len(r.labels) == len(base.input_ids) + 6
    p0, p1 = [i for i, x in enumerate(base.input_ids) if x == img]
    # first image at p0 (3 copies), second at p1 shifted by the 2 extra copies of the first
    assert r.input_ids[p0:p0 + 3] == [img] * 3 and r.input_ids[p0 + 3] != img
    assert r.input_ids[p1 + 2:p1 + 7] == [img] * 5 and r.input_ids[p1 + 7] != img
    assert all(lab == -100 for tid, lab in zip(r.input_ids, r.labels) if tid == img)
    # removing the image copies gives back the unexpanded sequence, labels included
    strip = [(t, lab) for t, lab in zip(r.input_ids, r.labels) if t != img]
    assert strip == [(t, lab) for t, lab in zip(base.input_ids, base.labels) if t != img]
    assert r.text == base.text and r.num_images == 2


@pytest.mark.parametrize("counts", [[], [3], [1, 2, 3]])
def test_image_count_mismatch(tok, counts):
    with pytest.raises(ImageCountError) as err:
        render(CONVERSATIONS[2][1], "vicuna_v1", tok, image_token_counts=counts)
    assert "2 <image> marker" in str(err.value) and f"{len(counts)} image" in str(err.value)
    with pytest.raises(ImageCountError, match="0 <image> marker"):
        render(CONVERSATIONS[0][1], "vicuna_v1", tok, image_token_counts=[5])


def test_tokenizer_requirements(tok):
    with pytest.raises(TokenizerError, match="fast tokenizer"):
        render(CONVERSATIONS[0][1], "vicuna_v1", SimpleNamespace(is_fast=False))
    # A tokenizer without an <image> token splits the marker into pieces: refuse rather than mis-place features.
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(_training_text(), trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    plain_tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    assert render(CONVERSATIONS[0][1], "vicuna_v1", plain_tok).num_images == 0  # text-only is fine
    with pytest.raises(TokenizerError, match="no <image> token"):
        render(CONVERSATIONS[1][1], "vicuna_v1", plain_tok)


def test_stop_token_ids(tok):
    eos = tok.eos_token_id
    assert stop_token_ids("vicuna_v1", tok) == [eos]
    assert stop_token_ids("chatml_direct", tok) == [eos, tok.convert_tokens_to_ids("<|im_end|>")]
    assert stop_token_ids(get_template("llama3"), tok) == [eos, tok.convert_tokens_to_ids("<|eot_id|>")]
    for name in ALL_NAMES:
        assert get_template(name).stop_strings, name


def test_token_straddling_the_reply_start_is_not_labelled(tok):
    """Why reply_lead exists: put the space in the prefix instead and BPE's "ĠA" starts before the reply."""
    bad = Template("straddle", user_prefix="USER: ", user_suffix=" ", assistant_prefix="ASSISTANT: ",
                   assistant_suffix="</s>")
    r = render(CONVERSATIONS[0][1], bad, tok)
    assert r.text.endswith("ASSISTANT: A cat.</s>")
    assert tok.decode([lab for lab in r.labels if lab != -100]) == " cat.</s>"
