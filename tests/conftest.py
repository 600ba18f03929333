"""Test-wide settings (never reach a model hub, no analytics, quiet tokenizers) and the helpers several test
modules share: a cluster of real serve processes (controller, workers, OpenAI server) on loopback."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402  (after the settings above, which transformers reads at import)
from PIL import Image  # noqa: E402

from llava.templates import render_text  # noqa: E402
from serve.common import FrameSplitter, free_port  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from llava.testing import make_tiny_llm_dir, make_tiny_vision_dir  # noqa: E402


# ------------------------------------------------------------------------------------ serve processes

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"
IMAGE_TOKENS = 4  # tiny model: 16 px images, 8 px patches, CLS dropped -> 2 x 2
API_KEY = "test-key"


# ----------------------------------------------------------------------------------------------- helpers


def png(color=(255, 0, 0), size=(20, 20), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",  # tiny models: one thread per process beats oversubscribing the shared cores
            "PYTHONPATH": str(ROOT)}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    url: str
    log: Path

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""


@dataclass
class Cluster:
    tmp: Path
    model_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    def start(self, name: str, module: str, *args: str, port: int | None = None) -> Proc:
        port = port or free_port()
        log = self.tmp / f"{name}.log"
        popen = subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(port), *args], cwd=ROOT, env=env(),
            stdout=log.open("ab"), stderr=subprocess.STDOUT,
        )
        proc = Proc(name, popen, f"http://127.0.0.1:{port}", log)
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str, controller: str, *extra: str) -> Proc:
        return self.start(name, "serve.model_worker", "--model-path", str(self.model_dir), "--model-name", MODEL,
                          "--controller-address", controller, "--heart-beat-interval", "0.5", *extra)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.popen.wait(10)
            except subprocess.TimeoutExpired:
                p.popen.kill()


def wait_healthy(proc: Proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            if httpx.get(proc.url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} not healthy after {timeout} s:\n{proc.tail()}")


def wait_until(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def workers(controller: str) -> dict:
    return httpx.post(controller + "/list_workers").json()["workers"]


def stream_chunks(url: str, payload, *, timeout: float = 60.0) -> tuple[int, list[dict]]:
    """POST a generate request; (HTTP status, all chunks)."""
    content = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    with httpx.stream("POST", url, content=content, headers={"content-type": "application/json"}, timeout=timeout) as r:
        splitter = FrameSplitter()
        chunks = [c for data in r.iter_raw() for c in splitter.feed(data)]
        return r.status_code, chunks


def chatml_prompt(question: str, images: int = 0) -> str:
    return render_text([{"role": "user", "content": "<image>\n" * images + question}], "chatml_direct",
                       add_generation_prompt=True)


def greedy(payload: dict, **over) -> dict:
    return {"model": MODEL, "temperature": 0, "max_new_tokens": 8, **payload, **over}


def start_cluster(tmp: Path, n_workers: int, *, openai: bool = False, worker_args=()) -> Cluster:
    from llava.testing import make_tiny_llava

    cluster = Cluster(tmp, make_tiny_llava(tmp / "tiny"))
    controller = cluster.start("controller", "serve.controller", "--heart-beat-expiration", "3")
    for i in range(n_workers):
        cluster.start_worker(f"worker{i}", controller.url, *worker_args)
    if openai:
        cluster.start("openai", "serve.openai_api_server", "--controller-address", controller.url,
                      "--api-keys", API_KEY)
    try:
        for p in list(cluster.procs.values()):
            wait_healthy(p)
        wait_until(lambda: len(workers(controller.url)) == n_workers, 30, f"{n_workers} workers to register")
    except Exception:
        cluster.stop_all()
        raise
    return cluster


# ----------------------------------------------------------------------------------------- web stack

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------------------------------------- helpers


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)


def wait_for(probe, what: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except httpx.HTTPError:
            pass
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise RuntimeError(f"{p.args} exited with {p.returncode} waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)
    raise TimeoutError(f"{what} not ready after {timeout} s")


class Stack:
    """controller + one worker + web UI as processes; `url` is the web UI."""

    def __init__(self, model_dir: Path, tmp: Path, model_name: str, log_ip: bool = False):
        self.model_name = model_name
        self.log_dir = tmp / "weblogs"
        cport, wport, gport = free_port(), free_port(), free_port()
        self.controller = f"http://127.0.0.1:{cport}"
        self.url = f"http://127.0.0.1:{gport}/"
        self.logs = [tmp / "controller.log", tmp / "worker.log", tmp / "web.log"]
        web = ["serve.gradio_web_server", "--controller-url", self.controller, "--port", str(gport),
               "--log-dir", str(self.log_dir)] + (["--log-ip"] if log_ip else [])
        self.procs = [spawn(["serve.controller", "--port", str(cport)], self.logs[0])]
        self.procs.append(spawn(["serve.model_worker", "--model-path", str(model_dir), "--model-name", model_name,
                                 "--port", str(wport), "--controller-address", self.controller,
                                 "--heart-beat-interval", "2"], self.logs[1]))
        self.procs.append(spawn(web, self.logs[2]))

    def wait_ready(self, timeout: float) -> None:
        def registered() -> bool:
            return self.model_name in httpx.post(self.controller + "/list_models", timeout=2).json()["models"]

        wait_for(registered, "worker registration", self.procs, self.logs, timeout)
        wait_for(lambda: httpx.get(self.url, timeout=2).status_code == 200, "web UI", self.procs, self.logs, timeout)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def log_events(self) -> list[dict]:
        return [json.loads(line) for f in sorted(self.log_dir.glob("*-conv.jsonl")) for line in f.read_text().splitlines()]


# ----------------------------------------------------------------------------- original-format checkpoint


def original_checkpoint(root, *, projector_only=False, weights_format="bin"):
    """A tiny checkpoint laid out as the original LLaVA repository saves one."""
    vision = make_tiny_vision_dir(root / "clip")
    llm_dir = make_tiny_llm_dir(root / "vicuna")
    llm = AutoModelForCausalLM.from_pretrained(llm_dir)
    config = json.loads((llm_dir / "config.json").read_text())
    config.update(
        model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=str(vision),
        mm_projector_type="mlp2x_gelu", mm_hidden_size=32, mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", image_aspect_ratio="pad", mm_use_im_start_end=False,
        mm_patch_merge_type="flat", tune_mm_mlp_adapter=projector_only,
    )
    torch.manual_seed(1)
    projector = {
        "model.mm_projector.0.weight": torch.randn(64, 32) * 0.1, "model.mm_projector.0.bias": torch.randn(64) * 0.1,
        "model.mm_projector.2.weight": torch.randn(64, 64) * 0.1, "model.mm_projector.2.bias": torch.randn(64) * 0.1,
    }
    out = root / "llava-v1.5-tiny"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    if projector_only:
        save_file(projector, out / "mm_projector.safetensors")
    else:
        state = {**llm.state_dict(), **projector}
        if weights_format == "bin":
            torch.save(state, out / "pytorch_model.bin")
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
        for f in llm_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                (out / f.name).write_bytes(f.read_bytes())
    return out, vision, llm_dir, llm, projector
