"""One command for the whole demo: controller + one model worker + web UI, as subprocesses on loopback.

Run: `python -m serve.launch [--model-path default] [--model-name NAME] [--port 7860] [--controller-port 21001]
[--worker-port 21002] [--host 127.0.0.1] [--log-dir serve_logs] [--startup-timeout 600]` (this is `make demo`).

Promises:
- Starts the controller first (so the worker's first registration succeeds), then the worker and the web UI side by
  side; prints `LLaVA demo ready: <url>` only once the worker has registered with the controller and the web UI
  answers, and prints each child's pid (`started <name> pid <pid>`).
- On Ctrl-C or SIGTERM, or when any child dies, stops every child (web UI, worker, controller: SIGTERM, then SIGKILL
  after a grace period) and waits for them: no orphans. Each child runs in its own process group (so a terminal's
  Ctrl-C reaches only the launcher, which then stops the children in order) and, on Linux, is also told by the kernel
  to exit if the launcher itself is killed with SIGKILL.
- Exit status: 0 after a requested shutdown; 1 when a child failed or startup timed out (the message names which).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class LaunchError(RuntimeError):
    """A child exited early or did not become ready in time."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen


def _child_setup() -> None:
    """Runs in the child before exec: own process group, and die with the launcher (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start(name: str, args: list[str], env: dict[str, str]) -> Child:
    proc = subprocess.Popen([sys.executable, "-m", *args], env=env, preexec_fn=_child_setup)
    print(f"started {name} pid {proc.pid}", flush=True)
    return Child(name, proc)


def stop_all(children: list[Child], grace: float = 10.0) -> None:
    """SIGTERM each child's process group (newest first), then SIGKILL whatever outlives the grace period."""
    for child in reversed(children):
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in reversed(children):
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{child.name} (pid {child.proc.pid}) ignored SIGTERM; killing it", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, signal.SIGKILL)
            child.proc.wait()


def wait_until(ready: Callable[[], bool], what: str, children: list[Child], timeout: float,
               stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for child in children:
            if child.proc.poll() is not None:
                raise LaunchError(f"{child.name} exited with code {child.proc.returncode} while waiting for {what}")
        if stop.is_set():
            raise KeyboardInterrupt
        if time.monotonic() > deadline:
            raise LaunchError(f"timed out after {timeout:.0f} s waiting for {what}")
        stop.wait(0.25)


def answers(method: str, url: str, check: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return check(httpx.request(method, url, timeout=2.0))
        except httpx.HTTPError:
            return False

    return probe


def has_model(name: str | None) -> Callable[[httpx.Response], bool]:
    def check(r: httpx.Response) -> bool:
        models = r.json().get("models", []) if r.status_code == 200 else []
        return (name in models) if name else bool(models)

    return check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Start controller + model worker + web UI (the LLaVA demo)")
    p.add_argument("--model-path", default="default", help="what the worker loads (default: the embedded model)")
    p.add_argument("--model-name", default=None)
    p.add_argument("--dtype", default="auto", help="worker dtype: auto (what this machine runs fastest) | float32 | "
                   "bfloat16 | float16")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4", "8bit", "4bit"],
                   help="worker weight quantization (auto: what the model records as passing its quality gate)")
    p.add_argument("--host", default="127.0.0.1", help="address of the web UI (the servers stay on loopback)")
    p.add_argument("--port", type=int, default=7860, help="web UI port")
    p.add_argument("--controller-port", type=int, default=21001)
    p.add_argument("--worker-port", type=int, default=21002)
    p.add_argument("--log-dir", default="serve_logs")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds to wait for the worker (the first run builds the default model)")
    return p


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    # the children import `serve` from this checkout wherever the launcher was started from
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": path}
    loop = "127.0.0.1"
    controller = f"http://{loop}:{args.controller_port}"
    web_url = f"http://{args.host}:{args.port}"
    children: list[Child] = []
    t0 = time.monotonic()
    try:
        children.append(start("controller", ["serve.controller", "--host", loop, "--port", str(args.controller_port)], env))
        wait_until(answers("GET", controller + "/health"), "the controller", children, 60, stop)
        worker = ["serve.model_worker", "--model-path", args.model_path, "--host", loop, "--port",
                  str(args.worker_port), "--controller-address", controller]
        if args.model_name:
            worker += ["--model-name", args.model_name]
        worker += ["--dtype", args.dtype, "--quantization", args.quantization]
        children.append(start("model worker", worker, env))
        children.append(start("web UI", ["serve.gradio_web_server", "--controller-url", controller, "--host",
                                         args.host, "--port", str(args.port), "--log-dir", args.log_dir], env))
        wait_until(answers("POST", controller + "/list_models", has_model(args.model_name)),
                   "the model worker to register", children, args.startup_timeout, stop)
        wait_until(answers("GET", f"http://{loop if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/"),
                   "the web UI", children, 120, stop)
        print(f"LLaVA demo ready in {time.monotonic() - t0:.1f} s: {web_url}  (Ctrl-C stops everything)", flush=True)
        while not stop.wait(0.5):
            for child in children:
                if child.proc.poll() is not None:
                    raise LaunchError(f"{child.name} exited with code {child.proc.returncode}")
        return 0
    except KeyboardInterrupt:
        return 0
    except LaunchError as e:
        print(f"launch failed: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        print("stopping...", flush=True)
        stop_all(children)
        print("all stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sys.exit(run(args, stop))


if __name__ == "__main__":
    main()
