"""The public API survives the layout (issue 18): every exported and every documented name imports, the flat
module paths are the same module objects as the layered ones, the layers import only downwards, there is no
import circle inside ``safekd.training`` (a checkpoint written before the move: test_checkpoint)."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

import safekd
from safekd._aliases import ALIASES, MOVED_INTO_PACKAGE, new_name

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
DOTTED = re.compile(r"(?<![\w/.-])safekd(?:\.[A-Za-z_]\w*)+")


def _documented_paths() -> list[str]:
    found = {m.group(0) for doc in DOCUMENTS for m in DOTTED.finditer(doc.read_text(encoding="utf-8"))}
    return sorted(found)


def _resolve(path: str):
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as exc:
            if exc.name is not None and not ".".join(parts[:i]).startswith(exc.name):
                raise  # a module that exists but fails to import: not a missing path
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


@pytest.mark.parametrize("name", sorted(safekd._EXPORTS))
def test_every_export_imports(name):
    module = importlib.import_module(safekd._EXPORTS[name])
    assert getattr(safekd, name) is getattr(module, name)
    assert name in dir(safekd)


def test_documented_paths_are_found():
    paths = _documented_paths()
    assert len(paths) > 50, "the documents should name the API (README.md, docs/)"
    failures = []
    for path in paths:
        try:
            _resolve(path)
        except Exception as exc:  # noqa: BLE001 - collect every failure
            failures.append(f"{path}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


def _old_paths() -> list[str]:
    """Every module path of the flat layout: the aliases and the submodules of aliased packages."""
    paths = set(ALIASES)
    for old, new in ALIASES.items():
        for location in importlib.util.find_spec(new).submodule_search_locations or ():
            paths.update(f"{old}.{p.stem}" for p in Path(location).glob("*.py") if p.stem != "__init__")
    return sorted(paths)


@pytest.mark.parametrize("old", _old_paths())
def test_old_path_is_the_same_module(old):
    new = new_name(old)
    assert new is not None
    a, b = importlib.import_module(old), importlib.import_module(new)
    assert a is b, f"{old} and {new} are two module objects"
    assert sys.modules[old] is sys.modules[new]
    assert a.__name__ == new and a.__spec__.name == new  # one identity: classes keep the new __module__
    parent, _, child = old.rpartition(".")
    assert getattr(importlib.import_module(parent), child) is a


def test_old_path_forms():
    import safekd.distiller
    import safekd.training.distiller
    import safekd.weighting.token
    from safekd import constraints as C
    from safekd.weighting import ConfidenceSoftmax
    from safekd.weighting.token import ConfidenceSoftmax as C2

    assert safekd.distiller is safekd.training.distiller
    assert ConfidenceSoftmax is C2 and ConfidenceSoftmax.__module__ == "safekd.targets.weighting.token"
    assert C is importlib.import_module("safekd.spec.constraints")
    assert safekd.weighting.token is importlib.import_module("safekd.targets.weighting.token")


@pytest.mark.parametrize("package", sorted(MOVED_INTO_PACKAGE))
def test_old_module_names_found_in_its_package(package):
    """``safekd.spec`` and ``safekd.targets`` were modules: their names (private ones too) are still found."""
    holder = importlib.import_module(MOVED_INTO_PACKAGE[package])
    pkg = importlib.import_module(package)
    names = [n for n in vars(holder) if not n.startswith("__")]
    for name in names:
        if importlib.util.find_spec(f"{package}.{name}") is None:
            assert getattr(pkg, name) is getattr(holder, name), name
    assert set(names) <= set(dir(pkg))
    with pytest.raises(AttributeError):
        getattr(pkg, "no_such_name")


def test_import_safekd_stays_cheap():
    import subprocess

    code = ("import sys, safekd; heavy = [m for m in ('torch', 'numpy', 'safekd.spec', 'safekd.targets', "
            "'safekd.training', 'safekd.common') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --- the layers ------------------------------------------------------------------------------------------------

#: rank of each room: an import may only point to a room of lower rank (same room: free, but see training).
LAYERS: dict[str, int] = {
    "solvers": 0, "safekd._aliases": 0, "safekd.data": 0,
    "safekd.common": 1,
    "safekd.spec": 2,
    "safekd.targets": 3,
    "safekd.training": 4,
    "safekd.auditing": 5, "safekd.integrations": 5, "safekd.theory": 5,
    "safekd.jobs": 6,
    "safekd.demo": 7,
    "safekd.cli": 8,
    "safekd.__main__": 9, "safekd": 9,
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in ("safekd", "solvers"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every module each module imports (top-level, lazy and ``TYPE_CHECKING`` imports alike)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets.add(source)
                targets.update(f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules)
        graph[name] = {t for t in targets if t in modules}
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[0] if parts[0] == "solvers" else ".".join(parts[:2])


def test_layers_import_only_downwards():
    modules = _modules()
    graph = _imports(modules)
    rooms = {_room(m) for m in modules}
    assert rooms <= set(LAYERS), (f"modules outside the layers: {sorted(rooms - set(LAYERS))}; move a new module into "
                                  "the layer it belongs to (safekd/spec, targets, training, common) or give it a rank")
    bad = [f"{a} -> {b}" for a, targets in sorted(graph.items()) for b in sorted(targets)
           if _room(a) != _room(b) and LAYERS[_room(b)] >= LAYERS[_room(a)]]
    assert not bad, "imports against the layers (docs/architecture.md):\n" + "\n".join(bad)


def test_package_imports_the_layered_paths():
    """Inside safekd and solvers, no import goes through an old path (the aliases are for users)."""
    bad = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                bad += [f"{name}: import {a.name}" for a in node.names if new_name(a.name)]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if new_name(node.module):
                    bad.append(f"{name}: from {node.module} import ...")
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if new_name(full) or (node.module in MOVED_INTO_PACKAGE
                                          and importlib.util.find_spec(full) is None):
                        bad.append(f"{name}: from {node.module} import {a.name}")
    assert not bad, "\n".join(bad)


def test_no_import_circle_inside_training():
    graph = {m: {t for t in ts if t.startswith("safekd.training.")}
             for m, ts in _imports(_modules()).items() if m.startswith("safekd.training.")}
    assert {"safekd.training.distiller", "safekd.training.checkpoint"} <= set(graph)
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_installed_packages_cover_the_layers():
    """Every package directory is a package (``__init__.py``), so setuptools' discovery installs it."""
    for directory in (ROOT / "safekd").rglob("*"):
        if directory.is_dir() and any(directory.glob("*.py")):
            assert (directory / "__init__.py").exists(), directory
