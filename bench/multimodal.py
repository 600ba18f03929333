"""Several images and a video per request on the embedded default model (`python -m bench.multimodal`).

For 1, 4 and 8 images in one request and for one 16-frame video (an mp4 encoded here, decoded by `llava.video`),
each request alone on an idle engine, one run each:
- TTFT with nothing cached (new pictures: the vision encoder runs) and with the features cached (the same pictures
  again; the prefix cache is off, so only the image-feature cache differs), and their ratio;
- decode tokens/s of the 32 tokens that follow (greedy, EOS ignored);
- for the video, the seconds spent decoding and sampling the file (outside TTFT).
The default model (DINOv2-small + SmolLM2-135M, plain `llava`) has no video token: a video is read as its frames,
each one an image at the model's own processing (64 tokens at 112 px), no pooling; so 16 frames cost 16 images.
Runs at the worker's precision (`--dtype auto --quantization auto`). Writes bench/results/multimodal.json with the CPU
flags; prints a table and a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.engine import RESULTS_DIR, cpu_flags
from llava.engine import Engine, GenerationRequest, SamplingParams
from llava.loading import LoadedModel, load_model
from llava.templates import stop_token_ids
from llava.video import decode_video

NEW_TOKENS = 32
FRAMES = 16
QUESTION = "Describe what you see."


def picture(seed: int) -> Image.Image:
    """A distinct small picture (a coloured disc on a background): no two share features."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (96, 96), tuple(int(c) for c in rng.integers(0, 255, 3)))
    x, y = (int(v) for v in rng.integers(8, 48, 2))
    ImageDraw.Draw(im).ellipse((x, y, x + 36, y + 36), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im


def clip(seed: int, frames: int = 48, size: int = 160) -> bytes:
    """An mp4 of a disc moving across the picture (`frames` frames at 24 fps)."""
    import av

    buf = io.BytesIO()
    base = picture(seed).resize((size, size))
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            im = base.copy()
            x = int(i * (size - 40) / max(1, frames - 1))
            ImageDraw.Draw(im).rectangle((x, size // 2 - 20, x + 40, size // 2 + 20), fill=(255, 255, 255))
            for packet in stream.encode(av.VideoFrame.from_image(im)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def timed(engine: Engine, prompt) -> dict:
    """TTFT and decode tokens/s of one request alone."""
    t0 = time.perf_counter()
    handle = engine.submit(GenerationRequest(prompt.input_ids, prompt.images, SamplingParams(
        max_new_tokens=NEW_TOKENS, ignore_eos=True), videos=prompt.videos))
    stamps = [time.perf_counter() for ev in handle if ev.token_id is not None]
    result = handle.result()
    if result.error:
        raise RuntimeError(result.error)
    return {"ttft_s": stamps[0] - t0, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def case(lm: LoadedModel, engine: Engine, label: str, build) -> dict:
    """`build(seed)` -> (prompt, extra): uncached with new content, then cached with the same content again."""
    prompt, extra = build(1)
    cold = timed(engine, prompt)
    warm = timed(engine, prompt)  # same images: features from the cache (prefix cache off)
    visual = sum(im.num_tokens for im in prompt.images) + sum(v.num_tokens for v in prompt.videos)
    return {"case": label, "prompt_tokens": len(prompt.input_ids), "visual_tokens": visual, **extra,
            "ttft_uncached_s": cold["ttft_s"], "ttft_cached_s": warm["ttft_s"],
            "ttft_ratio_uncached_over_cached": cold["ttft_s"] / warm["ttft_s"],
            "decode_tok_s_uncached": cold["decode_tok_s"], "decode_tok_s_cached": warm["decode_tok_s"]}


def images_case(lm: LoadedModel, n: int, seed: int):
    images = lm.process_images([picture(100 * seed + i) for i in range(n)])
    content = "<image>\n" * n + QUESTION
    return lm.prompt([{"role": "user", "content": content}], images), {"images": n}


def video_case(lm: LoadedModel, seed: int):
    data = clip(seed)
    t0 = time.perf_counter()
    decoded = decode_video(data, FRAMES)
    video = lm.process_video(decoded.frames)
    prep = time.perf_counter() - t0
    prompt = lm.prompt([{"role": "user", "content": "<video>\n" + QUESTION}], videos=[video])
    return prompt, {"frames": len(decoded.frames), "video_bytes": len(data), "decode_and_process_s": prep}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.multimodal", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "multimodal.json")
    args = ap.parse_args(argv)
    lm = load_model("default", dtype=args.dtype, quantization=args.quantization)
    engine = Engine(lm.model, lm.tokenizer, eos_token_ids=stop_token_ids(lm.template, lm.tokenizer),
                    prefix_cache_tokens=0).start()
    try:
        timed(engine, lm.prompt([{"role": "user", "content": "Hi"}]))  # first-call costs (kernels, buffers)
        rows = [case(lm, engine, f"{n} image{'s' * (n > 1)}", lambda s, n=n: images_case(lm, n, s)) for n in (1, 4, 8)]
        rows.append(case(lm, engine, f"video, {FRAMES} frames", lambda s: video_case(lm, s)))
    finally:
        engine.shutdown()
    one = rows[0]
    for r in rows:
        r["ttft_uncached_vs_1_image"] = r["ttft_uncached_s"] / one["ttft_uncached_s"]
        r["decode_tok_s_vs_1_image"] = r["decode_tok_s_cached"] / one["decode_tok_s_cached"]
    res = {
        "cpu": cpu_flags(), "model": "default", "precision": lm.precision_reason, "runner": engine.runner_name,
        "new_tokens": NEW_TOKENS, "runs": 1,
        "video_reading": "frames as images (the default model is a plain llava with no video token): "
                         f"{FRAMES} frames x {lm.process_images([picture(0)])[0].num_tokens} tokens, no pooling",
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"{'case':<18}{'tokens':>8}{'visual':>8}{'TTFT cold':>11}{'TTFT cached':>13}{'ratio':>7}{'tok/s':>8}")
    for r in rows:
        print(f"{r['case']:<18}{r['prompt_tokens']:>8}{r['visual_tokens']:>8}{r['ttft_uncached_s']:>10.2f}s"
              f"{r['ttft_cached_s']:>12.2f}s{r['ttft_ratio_uncached_over_cached']:>7.2f}{r['decode_tok_s_cached']:>8.1f}")
    print(res["cpu"])
    print(json.dumps({r["case"]: {"ttft_cold": round(r["ttft_uncached_s"], 3), "ttft_cached": round(r["ttft_cached_s"], 3),
                                  "tok_s": round(r["decode_tok_s_cached"], 1)} for r in rows}))
    return res


if __name__ == "__main__":
    main()
