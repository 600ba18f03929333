"""Tiny random parts for tests and quick benchmarks: a byte-level BPE tokenizer trained offline, and
vision / LLM folders in the same HF layout as real checkpoints, so tests exercise the real loading paths.

Nothing here downloads anything. Sizes follow the house style: hidden 32-64, 2 layers, 16-32 px images.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Special tokens of every template family, so one tiny tokenizer serves all template tests.
SPECIAL_TOKENS = [
    "<pad>", "<s>", "</s>", "<image>",
    "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]

_WORDS = (
    "a the what is color shape of this image picture circle rectangle triangle red green blue yellow "
    "black gray teal brown yes no there does contain answer question using single word or phrase "
    "chat between curious user and artificial intelligence assistant gives helpful detailed polite "
    "answers to questions human you are language vision able understand visual content provides "
    "assist with variety tasks natural hello how are today describe photo cat dog in on it"
).split()


def _corpus() -> list[str]:
    lines = []
    for i, w in enumerate(_WORDS):
        lines.append(" ".join(_WORDS[i:] + _WORDS[:i]))
        lines.append(f"USER: {w}? ASSISTANT: {w.capitalize()}. [INST] {w} [/INST] system user assistant")
    lines.append("0123456789 .,:;!?'\"()[]{}<>/\\-_=+*&^%$#@~`|\n\t")
    return lines


def make_tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no UNK: any text encodes) with the templates' special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
