"""Tiny random parts for tests and quick benchmarks (never used to serve): a byte-level BPE tokenizer trained offline, and
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


def make_tiny_tokenizer(vocab_size: int = 400, with_video: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no UNK: any text encodes) with the templates' special tokens (and `<video>`, for
    LLaVA-OneVision-like models, with `with_video`)."""
    specials = SPECIAL_TOKENS + (["<video>"] if with_video else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", **({"video_token": "<video>"} if with_video else {})},
        additional_special_tokens=specials[4:],
    )


def make_tiny_vision_dir(path: str | Path, family: str = "clip", image_size: int = 16, patch_size: int = 8) -> Path:
    """A random 2-layer vision encoder saved as an HF folder: family clip | siglip | dinov2."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=image_size, patch_size=patch_size)
    families = {
        "clip": (CLIPVisionConfig, CLIPVisionModel),
        "siglip": (SiglipVisionConfig, SiglipVisionModel),
        "dinov2": (Dinov2Config, Dinov2Model),
    }
    if family not in families:
        raise ValueError(f"unknown tiny vision family {family!r}; valid: {', '.join(families)}")
    config_cls, model_cls = families[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**common))
    path = Path(path)
    model.save_pretrained(path)
    return path


def make_tiny_llm_dir(path: str | Path, hidden_size: int = 64, with_image_token: bool = False) -> Path:
    """A random 2-layer Llama with the tiny tokenizer, saved as an HF folder.

    By default the tokenizer has no named image token, so assembly's token-adding path is exercised."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    if not with_image_token:
        tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=None,
    )
    path = Path(path)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_llava(out_dir: str | Path, *, family: str = "clip", projector: str = "mlp2x_gelu", image_mode: str = "pad",
                    template: str = "chatml_direct", image_size: int = 16, grid_pinpoints=None,
                    vision_feature_layer: int | list[int] = -2, llm_hidden_size: int = 64) -> Path:
    """Assemble a tiny LLaVA checkpoint through the real assembly path (parts saved under out_dir/parts)."""
    from llava.assemble import assemble
    from llava.config import AssemblySpec

    out_dir = Path(out_dir)
    vision = make_tiny_vision_dir(out_dir / "parts" / f"vision-{family}", family, image_size=image_size)
    llm = make_tiny_llm_dir(out_dir / "parts" / "llm", hidden_size=llm_hidden_size)
    spec = AssemblySpec(
        vision_encoder=str(vision), llm=str(llm), template=template, projector=projector, image_mode=image_mode,
        grid_pinpoints=grid_pinpoints, vision_feature_layer=vision_feature_layer,
    )
    return assemble(spec, out_dir / "model")
