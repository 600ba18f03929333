"""A cluster across "hosts" with a shared secret, and LoRA adapters served per request, with real processes:
controller on 127.0.0.1, workers bound to 127.0.0.2 and 127.0.0.3 (distinct loopback addresses standing in for
hosts), the OpenAI server in front. Shown: registration and calls need the cluster token (a worker with the wrong
one is refused with a message naming the flag), dispatch to both hosts, adapters listed with their base and chosen
by `model`, loaded and unloaded at run time through the API, and a killed host dropped and re-registered."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from serve.common import free_port

from conftest import (  # noqa: E402
    API_KEY, MODEL, ROOT, Cluster, Proc, chatml_prompt, env, greedy, stream_chunks, wait_healthy, wait_until, workers,
)

TOKEN = "cluster-secret"
LLM_TARGETS = r".*model\.language_model\..*\.(q_proj|v_proj|gate_proj|down_proj)"


def _start(cluster: Cluster, name: str, module: str, host: str, *args: str, token: str | None = TOKEN) -> Proc:
    port = free_port(host)
    log = cluster.tmp / f"{name}.log"
    auth = ("--auth-token", token) if token else ()
    popen = subprocess.Popen([sys.executable, "-m", module, "--host", host, "--port", str(port), *auth, *args],
                             cwd=ROOT, env=env(), stdout=log.open("ab"), stderr=subprocess.STDOUT)
    proc = Proc(name, popen, f"http://{host}:{port}", log)
    cluster.procs[name] = proc
    return proc


def _worker(cluster: Cluster, name: str, host: str, *extra: str, token: str | None = TOKEN) -> Proc:
    return _start(cluster, name, "serve.model_worker", host, "--model-path", str(cluster.model_dir),
                  "--model-name", MODEL, "--controller-address", cluster.procs["controller"].url,
                  "--heart-beat-interval", "0.5", "--no-warm-up", *extra, token=token)


def _make_adapter(model_dir, out, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLM_TARGETS,
                                                  init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from llava.testing import make_tiny_llava

    tmp = tmp_path_factory.mktemp("hosts")
    try:  # a sandbox without the whole 127/8 on loopback cannot stand in for several hosts
        with __import__("socket").create_server(("127.0.0.2", 0)):
            pass
    except OSError as e:
        pytest.skip(f"127.0.0.2 is not bindable here: {e}")
    c = Cluster(tmp, make_tiny_llava(tmp / "tiny"))
    _make_adapter(c.model_dir, tmp / "lora-a", 1)
    _make_adapter(c.model_dir, tmp / "lora-b", 2)
    ctl = _start(c, "controller", "serve.controller", "127.0.0.1", "--heart-beat-expiration", "3",
                 "--allowed-worker-hosts", "127.0.0.0/29")
    _worker(c, "host2", "127.0.0.2", "--lora-modules", f"tiny-a={tmp / 'lora-a'}")
    _worker(c, "host3", "127.0.0.3", "--lora-modules", f"tiny-a={tmp / 'lora-a'}")
    _start(c, "openai", "serve.openai_api_server", "127.0.0.1", "--controller-address", ctl.url,
           "--api-keys", API_KEY)
    try:
        for p in list(c.procs.values()):
            wait_healthy(p)
        wait_until(lambda: len(workers(ctl.url)) == 2, 60, "2 workers to register")
    except Exception:
        c.stop_all()
        raise
    yield c
    c.stop_all()


def _chat(cluster, model: str, question: str = "hello", **kw) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 8,
            "temperature": 0, **kw}
    return httpx.post(cluster.procs["openai"].url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


def _admin(cluster, endpoint: str, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(cluster.procs["openai"].url + endpoint, json=body, headers=headers, timeout=120)


def test_workers_on_two_hosts_register_with_the_token_and_serve(cluster):
    ctl = cluster.procs["controller"].url
    urls = set(workers(ctl))
    assert urls == {cluster.procs["host2"].url, cluster.procs["host3"].url}
    assert all(u.startswith(("http://127.0.0.2:", "http://127.0.0.3:")) for u in urls)

    def one(_):
        with httpx.stream("POST", ctl + "/worker_generate_stream", json=greedy({"prompt": chatml_prompt("hi")},
                                                                               max_new_tokens=32), timeout=60) as r:
            r.read()
            return r.status_code, r.headers["X-Worker-Address"]

    with ThreadPoolExecutor(4) as pool:  # concurrent: shortest-queue dispatch spreads them over both hosts
        results = list(pool.map(one, range(4)))
    assert all(status == 200 for status, _ in results)
    assert {url for _, url in results} == urls


def test_calls_without_the_token_are_refused_with_the_cause(cluster):
    worker = cluster.procs["host2"].url
    status, chunks = stream_chunks(worker + "/worker_generate_stream", greedy({"prompt": chatml_prompt("hi")}))
    assert status == 401 and "--auth-token" in chunks[0]["text"] and "no token" in chunks[0]["text"]
    r = httpx.post(worker + "/worker_get_status", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "a different token" in r.json()["error"]["message"]
    ok = httpx.post(worker + "/worker_get_status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["adapters"] == {"tiny-a": MODEL}
    assert httpx.get(worker + "/health").status_code == 200  # liveness probes need no secret
    r = httpx.post(cluster.procs["controller"].url + "/register_worker",
                   json={"worker_name": "http://127.0.0.4:1", "worker_status": {"model_names": ["x"]}})
    assert r.status_code == 401 and "worker registration refused" in r.json()["error"]["message"]


def test_a_worker_with_the_wrong_token_is_refused(cluster):
    bad = _worker(cluster, "intruder", "127.0.0.4", token="not-the-secret")
    try:
        wait_healthy(bad)
        wait_until(lambda: "worker registration refused" in bad.tail(), 30, "the refusal in the worker's log")
        assert "a different token" in bad.tail() and "--auth-token" in bad.tail()
        assert bad.url not in workers(cluster.procs["controller"].url)
    finally:
        bad.popen.send_signal(signal.SIGTERM)
        bad.popen.wait(10)
        del cluster.procs["intruder"]


def test_adapters_listed_with_their_base_and_chosen_by_model(cluster):
    r = httpx.get(cluster.procs["openai"].url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    models = {m["id"]: m for m in r.json()["data"]}
    assert models[MODEL]["parent"] is None and models["tiny-a"]["parent"] == MODEL
    base = _chat(cluster, MODEL).json()["choices"][0]["message"]["content"]
    adapted = _chat(cluster, "tiny-a").json()
    assert adapted["model"] == "tiny-a" and adapted["choices"][0]["message"]["content"] != base
    again = _chat(cluster, "tiny-a").json()["choices"][0]["message"]["content"]
    assert again == adapted["choices"][0]["message"]["content"]  # greedy; either host gives the same


def test_load_and_unload_adapters_at_run_time(cluster):
    path = str(cluster.tmp / "lora-b")
    r = _admin(cluster, "/v1/load_lora_adapter", {"lora_name": "tiny-b", "lora_path": path}, key=None)
    assert r.status_code == 401
    r = _admin(cluster, "/v1/load_lora_adapter", {"lora_name": "tiny-b", "lora_path": str(cluster.tmp / "nope")})
    assert r.status_code == 400 and "no such folder" in r.json()["error"]["message"]
    r = _admin(cluster, "/v1/load_lora_adapter", {"lora_name": "tiny-b", "lora_path": path})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'tiny-b' added successfully."
    # both hosts have it, and the controller knew at once (no heartbeat wait)
    listed = httpx.post(cluster.procs["controller"].url + "/list_models").json()
    assert listed["adapters"] == {"tiny-a": MODEL, "tiny-b": MODEL}
    outs = {name: _chat(cluster, name).json()["choices"][0]["message"]["content"] for name in (MODEL, "tiny-a", "tiny-b")}
    assert len(set(outs.values())) == 3
    r = _admin(cluster, "/v1/unload_lora_adapter", {"lora_name": "tiny-b"})
    assert r.status_code == 200
    gone = _chat(cluster, "tiny-b")
    assert gone.status_code == 404 and "tiny-b" in gone.json()["error"]["message"]
    r = _admin(cluster, "/v1/unload_lora_adapter", {"lora_name": "tiny-b"})
    assert r.status_code == 404 and "no worker holds adapter 'tiny-b'" in r.json()["error"]["message"]


def test_a_killed_host_is_dropped_and_comes_back(cluster):
    ctl = cluster.procs["controller"].url
    victim = cluster.procs["host3"]
    victim.popen.send_signal(signal.SIGKILL)
    victim.popen.wait(10)
    t0 = time.monotonic()
    wait_until(lambda: victim.url not in workers(ctl), 15, "the killed host to be dropped")
    dropped_after = time.monotonic() - t0
    assert dropped_after < 6  # heart-beat expiration 3 s, checked every 0.75 s
    for _ in range(4):  # the remaining host serves everything meanwhile
        assert _chat(cluster, "tiny-a").status_code == 200
    back = _worker(cluster, "host3", "127.0.0.3", "--lora-modules", f"tiny-a={cluster.tmp / 'lora-a'}")
    wait_healthy(back)
    wait_until(lambda: back.url in workers(ctl), 30, "the restarted host to register")
