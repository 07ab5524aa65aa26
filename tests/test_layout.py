"""The architecture as the import graph shows it: the engine never imports the control plane, no module
imports itself through others, each app package imports only the packages below it, and the SDK loads
no Ray, torch or SQL. Read from the source with `ast` (every import, also those inside functions), so a
lazy import cannot hide an edge."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# app package -> the app packages it may import (itself always). app.api.main and app.api.serve are the
# composition root and may import anything; app.client may import app.api.jsonrpc (the protocol's error
# codes, pydantic only) at import time and the server side inside the local-stack commands.
ALLOWED = {
    "app.settings": set(),
    "app.data": {"app.settings"},
    "app.api": {"app.data", "app.settings"},
    "app.research": {"app.api", "app.data", "app.settings"},
    "app.jobs": {"app.research", "app.api", "app.data", "app.settings"},
    "app.serving": {"app.jobs", "app.api", "app.data", "app.settings"},
    "app.client": {"app.api", "app.data", "app.settings"},
}
COMPOSITION_ROOT = {"app.api.main", "app.api.serve"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("app", "grpo") for p in (ROOT / top).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str], *, top_level_only: bool = False) -> set[str]:
    """The project modules `name` imports: `import a.b`, `from a import b` (b a module or a name of a),
    relative imports; with top_level_only, only those that run when the module is imported."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{a.name}" for a in node.names} | {base}
    out = set()
    for target in found:
        while target and target not in known:  # `from a.b import f` -> a.b
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def graph(*, top_level_only: bool = False) -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, p, set(mods), top_level_only=top_level_only) for m, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours). A package's
    `__init__` importing its own submodules is not a cycle of the design, so parent edges are left out."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if m.startswith(n + "."):
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if state.get(n) is None and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if state.get(m) is None and (c := visit(m)):
            return c
    return None


def package_of(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if parts[0] == "app" and len(parts) > 1 else parts[0]


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, targets in g.items():
        if not m.startswith("app.") or m in COMPOSITION_ROOT:
            continue
        mine = package_of(m)
        for t in targets:
            theirs = package_of(t)
            if t.startswith("app.") and theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f"{m} imports {t} ({mine} may import {sorted(ALLOWED[mine]) or 'nothing of app'})")
            if t.startswith("app.") and t in COMPOSITION_ROOT and mine != "app.client":
                bad.append(f"{m} imports the composition root {t}")
    return bad


def test_the_engine_never_imports_the_control_plane():
    g = graph()
    bad = sorted(f"{m} imports {t}" for m, ts in g.items() if m.split(".")[0] == "grpo"
                 for t in ts if t.split(".")[0] == "app")
    assert bad == []


def test_no_import_cycles_even_through_function_level_imports():
    assert find_cycle(graph()) is None


def test_every_app_package_imports_only_the_packages_below_it():
    assert set(ALLOWED) == {package_of(m) for m in modules() if m.startswith("app.")}, "a new app package needs a layer"
    assert layer_violations(graph()) == []


def test_the_sdk_imports_only_the_protocol_at_import_time():
    g = graph(top_level_only=True)
    for m in (m for m in g if m.startswith("app.client")):
        assert {t for t in g[m] if not t.startswith("app.client")} <= {"app.api.jsonrpc", "app.api"}, m


def test_the_checks_catch_what_they_are_for():
    """The checks themselves on made-up graphs: a cycle, an engine -> app edge, a layer skipped upwards."""
    assert find_cycle({"grpo.a": {"grpo.b"}, "grpo.b": {"grpo.c"}, "grpo.c": {"grpo.a"}}) == [
        "grpo.a", "grpo.b", "grpo.c", "grpo.a"]
    assert find_cycle({"app.x": {"app.x.y"}, "app.x.y": {"app.x"}}) is None  # a package and its own module
    assert layer_violations({"app.data.db": {"app.jobs.training"}}) != []
    assert layer_violations({"app.research.catalog": {"app.api.main"}}) != []
    assert layer_violations({"app.api.main": {"app.jobs.training"}}) == []
    tree = {"grpo.run": {"app.api.main"}}
    assert [t for m, ts in tree.items() for t in ts if t.startswith("app")] == ["app.api.main"]


def test_importing_the_sdk_and_cli_loads_no_ray_torch_or_sql():
    heavy = ["ray", "torch", "transformers", "sqlalchemy", "sqlmodel", "fastapi", "redis", "alembic", "grpo"]
    code = ("import sys, app.client, app.client.cli; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_graph_sees_top_level_lazy_and_relative_edges():
    g, top = graph(), graph(top_level_only=True)
    assert {"app.api.auth", "app.data.db", "app.data.queue", "app.settings"} <= g["app.api.context"]
    assert "grpo.agents.episodes" in g["grpo.rollout"]  # imported inside generate_agent
    assert "grpo.agents.episodes" not in top["grpo.rollout"]
    assert "app.api.jsonrpc" in top["app.client.sdk"]
