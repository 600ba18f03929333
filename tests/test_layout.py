"""The direction of imports: llava never imports serve or train; serve and train never import each other."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"llava": {"serve", "train", "bench"}, "serve": {"train"}, "train": {"serve"}}


def _imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_packages_import_only_downward():
    violations = []
    for package, forbidden in FORBIDDEN.items():
        for path in (ROOT / package).rglob("*.py"):
            bad = _imported_packages(path) & forbidden
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not violations, violations


def test_importing_llava_loads_neither_serve_nor_train():
    code = "import sys, llava, llava.loading, llava.assemble; print(sorted(m for m in sys.modules if m.split('.')[0] in ('serve', 'train', 'gradio', 'fastapi')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_relaying_servers_do_not_import_torch():
    """The controller and the OpenAI API server only relay requests: they start in a moment, without torch."""
    code = ("import sys, serve.controller, serve.openai_api_server; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def _module_imports(path: Path, package: str) -> set[str]:
    """Modules of `package` that a file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == package:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_import_cycles_inside_a_package():
    for package in ("llava", "serve", "train"):
        modules = {}
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            modules[name] = path
        graph = {m: {i for i in _module_imports(p, package) if i in modules and i != m} for m, p in modules.items()}
        cycles = []

        def visit(node, stack, seen):
            for nxt in sorted(graph[node]):
                if nxt in stack:
                    cycles.append(stack[stack.index(nxt):] + [nxt])
                elif nxt not in seen:
                    seen.add(nxt)
                    visit(nxt, stack + [nxt], seen)

        for start in sorted(graph):
            visit(start, [start], {start})
        # a package's __init__ re-exporting its submodules is not a cycle of behaviour
        cycles = [c for c in cycles if not any(m == package for m in c)]
        assert not cycles, f"{package}: import cycles {sorted({' -> '.join(c) for c in cycles})[:5]}"
