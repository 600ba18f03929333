"""Tiny random LLaVA-OneVision and LLaVA-NeXT-Interleave models (SigLIP + Qwen2), built in code and saved as HF
folders like llava-hf's, for the tests of several images and video (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from llava.testing import make_tiny_tokenizer

SIZE, PATCH = 32, 8  # 4 x 4 = 16 tokens per view, 2 x 2 = 4 per video frame
BASE_TOKENS = (SIZE // PATCH) ** 2
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [96, 96]]
ANYRES_MAX = 2  # small, so a 3 x 3 grid of tiles is downsized as anyres_max_9 downsizes real ones
MEAN = STD = [0.5, 0.5, 0.5]
CONTEXT = 1024


def tokenizer():
    return make_tiny_tokenizer(with_video=True)


def _vision() -> SiglipVisionConfig:
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=SIZE, patch_size=PATCH)


def _text(tok) -> Qwen2Config:
    return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=CONTEXT,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)


def _randomize_biases(model) -> None:
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them matter
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)


def onevision_model(tok):
    torch.manual_seed(0)
    cfg = LlavaOnevisionConfig(
        vision_config=_vision().to_dict(), text_config=_text(tok).to_dict(), image_token_id=tok.image_token_id,
        video_token_id=tok.video_token_id, vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=f"anyres_max_{ANYRES_MAX}", tie_word_embeddings=True,
    )
    model = LlavaOnevisionForConditionalGeneration(cfg)
    _randomize_biases(model)
    with torch.no_grad():
        model.model.image_newline.normal_(0, 1)
    return model.eval()


def interleave_model(tok):
    torch.manual_seed(1)
    cfg = LlavaConfig(
        vision_config=_vision().to_dict(), text_config=_text(tok).to_dict(), image_token_id=tok.image_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=BASE_TOKENS,
    )
    model = LlavaForConditionalGeneration(cfg)
    _randomize_biases(model)
    return model.eval()


def onevision_image_processor() -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_grid_pinpoints=PINPOINTS,
                                           image_mean=MEAN, image_std=STD)


def siglip_image_processor() -> SiglipImageProcessorPil:
    return SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD)


def save(model, tok, processor, path: Path) -> Path:
    """An HF folder as llava-hf ships them: config + weights, tokenizer, preprocessor_config.json."""
    model.save_pretrained(path)
    tok.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def encode_video(n: int = 30, fmt: str = "mp4", codec: str = "mpeg4", size=(64, 48), fps: int = 10) -> bytes:
    """A small video file whose frame i is one flat grey of level (8 * i) % 256 (so a frame says its index)."""
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            frame = np.full((size[1], size[0], 3), (8 * i) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
