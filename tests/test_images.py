"""llava.images: safe loading, the four processing modes, token counts checked against transformers' LlavaNext
processor and model, and content hashing."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
)

from llava.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageError,
    ImageProcessing,
    ProcessingConfigError,
    content_hash,
    load_image,
    num_image_tokens,
    preprocess,
    select_best_resolution,
)
from llava.testing import make_tiny_tokenizer

PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))
ANYRES = ImageProcessing(mode="anyres", size=32, patch_size=8, grid_pinpoints=PINPOINTS)
# (height, width): square, wide, tall, extreme ratios, odd sizes, larger than every pinpoint
SIZES = [(32, 32), (20, 50), (50, 20), (7, 300), (300, 7), (33, 97), (64, 64), (120, 90), (200, 200)]


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(rgb) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height, and a few bytes of pixel data: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------- processing modes


def test_pad_fills_with_mean_colour_and_centres_the_image():
    red = Image.new("RGB", (40, 20), (255, 0, 0))  # wide: padded above and below
    out = preprocess(red, ImageProcessing(mode="pad", size=32, patch_size=8))
    x = out.pixel_values
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0], torch.zeros(3), atol=0.02)  # mean colour normalises to ~0
    assert torch.allclose(x[:, 31, 31], torch.zeros(3), atol=0.02)
    assert torch.allclose(x[:, 16, :], normalised((255, 0, 0))[:, None].expand(3, 32), atol=0.02)  # whole width
    assert out.image_size == (20, 40)


def test_resize_ignores_aspect_and_matches_clip_processor():
    image = random_image(16, 64)
    ours = preprocess(image, ImageProcessing(mode="resize", size=32, patch_size=8)).pixel_values
    theirs = CLIPImageProcessorPil(
        size={"height": 32, "width": 32}, do_center_crop=False, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )(image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_crop_keeps_the_centre_and_matches_clip_processor():
    bands = np.zeros((60, 20, 3), np.uint8)  # tall: red / green / blue thirds
    bands[:20, :, 0] = bands[20:40, :, 1] = bands[40:, :, 2] = 255
    image = Image.fromarray(bands)
    ours = preprocess(image, ImageProcessing(mode="crop", size=32, patch_size=8)).pixel_values
    assert ours.shape == (3, 32, 32)
    assert torch.allclose(ours[:, 4:28, :], normalised((0, 255, 0))[:, None, None].expand(3, 24, 32), atol=0.05)
    theirs = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )(random_image(45, 70), return_tensors="pt")["pixel_values"][0]
    ours = preprocess(random_image(45, 70), ImageProcessing(mode="crop", size=32, patch_size=8)).pixel_values
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("hw", SIZES)
def test_anyres_pixels_match_llava_next_processor(hw):
    image = random_image(*hw)
    out = preprocess(image, ANYRES)
    best_h, best_w = select_best_resolution(hw, PINPOINTS)
    assert out.pixel_values.shape == (1 + (best_h // 32) * (best_w // 32), 3, 32, 32)
    theirs = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=[list(p) for p in PINPOINTS],
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )(image, return_tensors="pt")
    torch.testing.assert_close(out.pixel_values, theirs["pixel_values"][0], atol=0, rtol=0)
    assert out.image_size == tuple(theirs["image_sizes"][0].tolist())
    # The global view comes first and is a plain resize of the whole image.
    global_view = preprocess(image, ImageProcessing(mode="resize", size=32, patch_size=8)).pixel_values
    torch.testing.assert_close(out.pixel_values[0], global_view, atol=1e-6, rtol=0)


def test_select_best_resolution_prefers_resolution_then_least_waste():
    assert select_best_resolution((20, 50), PINPOINTS) == (32, 64)  # wide: the wide grid
    assert select_best_resolution((7, 300), PINPOINTS) == (32, 96)
    assert select_best_resolution((10, 10), PINPOINTS) == (32, 64)  # ties on resolution: least waste, first wins
    assert select_best_resolution((500, 500), PINPOINTS) == (64, 64)


# ----------------------------------------------------------------------------------------------- token counts


def test_fixed_mode_token_counts():
    assert num_image_tokens(ImageProcessing(), (480, 640)) == 576  # LLaVA-1.5: 24x24, CLS dropped
    assert num_image_tokens(ImageProcessing(keep_cls=True), (1, 1)) == 577
    assert num_image_tokens(ImageProcessing(size=224, num_prefix_tokens=0, keep_cls=True), (9, 9)) == 256
    assert preprocess(random_image(10, 30), ImageProcessing(mode="crop", size=32, patch_size=8)).num_tokens == 16


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def count_image_tokens(processor, tok, image) -> int:
    ids = processor(images=[image], text=["<image> describe"], return_tensors="pt")["input_ids"]
    return int((ids == tok.image_token_id).sum())


@pytest.mark.parametrize("keep_cls", [False, True])
def test_fixed_mode_count_matches_llava_processor(tok, keep_cls):
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="full" if keep_cls else "default",
        num_additional_image_tokens=1,
    )
    proc = ImageProcessing(mode="crop", size=32, patch_size=8, keep_cls=keep_cls)
    assert num_image_tokens(proc, (20, 50)) == count_image_tokens(processor, tok, random_image(20, 50))


@pytest.fixture(scope="module")
def next_processor(tok):
    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=[list(p) for p in PINPOINTS],
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


@pytest.mark.parametrize("hw", SIZES)
def test_anyres_count_matches_llava_next_processor(tok, next_processor, hw):
    image = random_image(*hw)
    expected = count_image_tokens(next_processor, tok, image)
    assert num_image_tokens(ANYRES, hw) == expected
    assert preprocess(image, ANYRES).num_tokens == expected


@pytest.mark.parametrize("pinpoints", [((64, 64),), ((32, 32), (32, 128), (128, 32))])
def test_anyres_count_other_pinpoints(tok, pinpoints):
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=[list(p) for p in pinpoints],
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    proc = ImageProcessing(mode="anyres", size=32, patch_size=8, grid_pinpoints=pinpoints)
    for hw in [(20, 50), (50, 20), (13, 170), (100, 100)]:
        assert num_image_tokens(proc, hw) == count_image_tokens(processor, tok, random_image(*hw)), hw


@pytest.fixture(scope="module")
def next_model(tok):
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=512,
        ),
        image_token_index=tok.image_token_id,
        image_grid_pinpoints=[list(p) for p in PINPOINTS],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return LlavaNextForConditionalGeneration(config).eval()


@pytest.mark.parametrize("hw", [(20, 50), (7, 300), (120, 90), (64, 64)])
def test_anyres_count_matches_llava_next_model_features(tok, next_model, hw):
    out = preprocess(random_image(*hw), ANYRES)
    sizes = torch.tensor([out.image_size])
    with torch.no_grad():
        feats = next_model.get_image_features(pixel_values=out.pixel_values[None], image_sizes=sizes).pooler_output
        assert feats[0].shape[0] == out.num_tokens
        ids = torch.tensor([[tok.bos_token_id] + [tok.image_token_id] * out.num_tokens + [tok.eos_token_id]])
        logits = next_model(input_ids=ids, pixel_values=out.pixel_values[None], image_sizes=sizes).logits
        assert logits.shape[1] == ids.shape[1]
        short = torch.cat([ids[:, :1], ids[:, 2:]], dim=1)  # one <image> too few: the model must refuse it
        with pytest.raises(ValueError):
            next_model(input_ids=short, pixel_values=out.pixel_values[None], image_sizes=sizes)


# ----------------------------------------------------------------------------------------------- configuration


def test_processing_json_round_trip_and_key():
    proc = ImageProcessing(mode="anyres", size=32, patch_size=8, grid_pinpoints=PINPOINTS, mean=(0.5, 0.5, 0.5))
    back = ImageProcessing.from_dict(json.loads(json.dumps(proc.to_dict())))
    assert back == proc and back.key() == proc.key()
    assert ImageProcessing().key() == ImageProcessing().key()
    assert len({ImageProcessing().key(), ImageProcessing(mode="crop").key(), ImageProcessing(keep_cls=True).key()}) == 3
    assert "reading_orders" not in ImageProcessing().to_dict()  # keys written before it existed stay the same
    two = ImageProcessing(size=28, reading_orders=2)
    assert ImageProcessing.from_dict(two.to_dict()) == two and two.key() != ImageProcessing(size=28).key()
    assert num_image_tokens(two, (28, 28)) == 2 * num_image_tokens(ImageProcessing(size=28), (28, 28)) == 8


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"mode": "square"}, "unknown mode"),
        ({"size": 10, "patch_size": 14}, "at least patch_size"),
        ({"mode": "anyres"}, "needs grid_pinpoints"),
        ({"mode": "anyres", "size": 32, "patch_size": 8, "grid_pinpoints": ((32, 48),)}, "multiples of size"),
        ({"mode": "anyres", "size": 32, "patch_size": 8, "grid_pinpoints": PINPOINTS, "keep_cls": True}, "CLS"),
        ({"mode": "pad", "grid_pinpoints": PINPOINTS}, "only used by mode 'anyres'"),
        ({"reading_orders": 3}, "1 or 2"),
        ({"reading_orders": 2, "keep_cls": True}, "square patch grid"),
        ({"mode": "anyres", "size": 32, "patch_size": 8, "grid_pinpoints": PINPOINTS, "reading_orders": 2}, "square patch grid"),
    ],
)
def test_processing_rejects_inconsistent_config(kwargs, words):
    with pytest.raises(ProcessingConfigError, match=words):
        ImageProcessing(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ProcessingConfigError, match="image_aspect_ratio"):
        ImageProcessing.from_dict({"mode": "pad", "image_aspect_ratio": "pad"})


# ----------------------------------------------------------------------------------------------- loading


def test_load_accepts_bytes_path_data_uri_base64_and_pil(tmp_path):
    image = random_image(12, 17)
    data = encode(image)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    wrapped = "\n".join(b64[i : i + 60] for i in range(0, len(b64), 60))
    for src in [data, path, str(path), f"data:image/png;base64,{b64}", b64, wrapped, image.convert("RGBA")]:
        loaded = load_image(src)
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(image)), type(src)


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(encode(clear)).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "src, words",
    [
        (b"%PDF-1.4 definitely not a picture" * 4, "not an image"),
        (encode(random_image(64, 64))[:600], "truncated"),
        ("/no/such/file.png", "not an existing file"),
        ("data:image/png;base64,@@@@", "invalid base64"),
        (Image.new("I;16", (4, 4)), "unsupported image mode"),
    ],
)
def test_load_errors_name_the_cause(src, words):
    with pytest.raises(ImageError, match=words):
        load_image(src)


def test_load_limits_bytes_before_decoding(tmp_path):
    data = encode(random_image(32, 32))
    path = tmp_path / "big.png"
    path.write_bytes(data)
    for src in [data, path, base64.b64encode(data).decode()]:
        with pytest.raises(ImageError, match="too large"):
            load_image(src, max_bytes=len(data) - 1)
    assert load_image(data, max_bytes=len(data)).size == (32, 32)


def test_load_refuses_decompression_bombs_without_touching_pil_globals():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(png_header_only(7000, 7000))  # 49 M pixels > 40 M default, under PIL's own limit
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(png_header_only(30000, 30000))  # beyond PIL's own bomb limit too
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(random_image(20, 20), max_pixels=399)
    assert Image.MAX_IMAGE_PIXELS == before


# ----------------------------------------------------------------------------------------------- hashing


def test_content_hash_follows_pixels_not_file_format():
    image = random_image(9, 13)
    from_png, from_bmp = load_image(encode(image, "PNG")), load_image(encode(image, "BMP"))
    assert content_hash(from_png) == content_hash(from_bmp)
    changed = image.copy()
    changed.putpixel((0, 0), tuple(255 - v for v in image.getpixel((0, 0))))
    assert content_hash(load_image(encode(changed))) != content_hash(from_png)
    assert content_hash(image) != content_hash(image.transpose(Image.Transpose.TRANSPOSE))  # same bytes count, 13x9
    proc_a, proc_b = ImageProcessing(mode="pad"), ImageProcessing(mode="crop")
    assert preprocess(from_png, proc_a).key == preprocess(from_bmp, proc_a).key != preprocess(from_png, proc_b).key
