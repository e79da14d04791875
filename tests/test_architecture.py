"""The package's layout (docs/architecture.md): layers, no import cycle, small modules.

The import graph is read from the source with :mod:`ast`, every ``import`` statement
included, those inside functions too: a lazy import that closes a loop is still a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "diffq_triton"
# pyproject's package-dir: the top-level kernels/ folder installs as diffq_triton.kernels.
SOURCES = {PACKAGE: ROOT / "diffq_triton", f"{PACKAGE}.kernels": ROOT / "kernels"}
MAX_LINES = 400
MAX_ROOT_MODULES = 8

# Layer of each part, top to bottom: a module may import its own part and the parts of
# lower layers only. "" is the package's root __init__ (the public API).
LAYERS: dict[str, int] = {
    "cli": 0, "__main__": 0, "info": 0, "demo": 0, "gpu_report": 0,
    "": 1,
    "quantizers": 2, "nn": 2, "packed": 2,
    "serialization": 3,
    "ops": 4,
    "codec": 5, "kernels": 5,
    "validation": 6,
}
# Parts that must not import each other although both are allowed by their layers.
FORBIDDEN = {("quantizers", "nn"), ("nn", "quantizers"), ("codec", "kernels"),
             ("kernels", "codec"), ("packed", "quantizers"), ("quantizers", "packed"),
             ("packed", "nn"), ("nn", "packed")}


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours ``name`` denotes (an attribute's module for ``pkg.attr``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != module:
                out.add(resolved)
    return out


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _part(module: str) -> str:
    rest = module.removeprefix(PACKAGE).lstrip(".")
    return rest.split(".")[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_sees_lazy_imports():
    # ops.custom_ops imports the kernels inside a function (Triton is optional).
    assert f"{PACKAGE}.kernels.noise" in GRAPH[f"{PACKAGE}.ops.custom_ops"]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_part_has_a_layer():
    assert {_part(m) for m in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    part = _part(module)
    wrong = sorted(
        target for target in GRAPH[module]
        if _part(target) != part
        and (LAYERS[_part(target)] < LAYERS[part] or (part, _part(target)) in FORBIDDEN)
    )
    assert wrong == [], f"{module} (layer {LAYERS[part]}) imports upwards or sideways: {wrong}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines"


def test_few_modules_at_the_package_root():
    loose = sorted(p.name for p in (ROOT / PACKAGE).glob("*.py"))
    assert len(loose) <= MAX_ROOT_MODULES, loose


@pytest.mark.parametrize("package", sorted(m for m, p in MODULES.items()
                                           if p.name == "__init__.py"))
def test_each_package_says_its_job(package):
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text()))
    assert doc and len(doc.splitlines()[0]) > 20, f"{package} has no one-line docstring"


def test_every_package_is_installed():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert packages == listed


def test_the_map_names_every_part():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [part for part in LAYERS if part and f"`{part}" not in text]
    assert missing == []
