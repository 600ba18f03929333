"""`parse_prompt` reads LLaVA's templated prompts back into messages (the upstream-backed worker sends messages)."""

from __future__ import annotations

import pytest

from llava.templates import get_template, parse_prompt, render_text

CONVERSATIONS = [
    [{"role": "user", "content": "<image>\nWhat is it?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"},
     {"role": "assistant", "content": "A red circle."}, {"role": "user", "content": "And the <image> second one?"}],
]


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "llava_llama_2", "mistral_instruct", "chatml_direct",
                                      "llama3"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_round_trip_detected_and_named(template, conv):
    messages = CONVERSATIONS[conv]
    prompt = render_text(messages, template, add_generation_prompt=True)
    want = messages
    if messages[0]["role"] != "system" and get_template(template).system:  # the rendered default system prompt
        want = [{"role": "system", "content": get_template(template).system}, *messages]
    assert parse_prompt(prompt) == want
    assert parse_prompt(prompt, template) == want


def test_prompts_written_by_other_programs():
    # the original's chatml prompts put newlines between blocks; llama-2 prompts often lack the <s>
    chatml = ("<|im_start|>system\nAnswer.<|im_end|>\n<|im_start|>user\n<image>\nhi<|im_end|>\n"
              "<|im_start|>assistant\n")
    assert parse_prompt(chatml) == [{"role": "system", "content": "Answer."},
                                    {"role": "user", "content": "<image>\nhi"}]
    llama2 = "[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\n<image>\nWhat? [/INST]"
    assert parse_prompt(llama2) == [{"role": "system", "content": "Be kind."},
                                    {"role": "user", "content": "<image>\nWhat?"}]
    assert parse_prompt("no template at all <image>") == [{"role": "user", "content": "no template at all <image>"}]
