"""The module paths of the flat layout (before issue 18), kept as aliases of the layered modules.

``safekd`` used to hold its modules side by side (``safekd.distiller``, ``safekd.weighting.token``, ...); they now
live in the layer they belong to (``safekd.training.distiller``, ``safekd.targets.weighting.token``, ...). The old
paths are not files: :data:`ALIASES` maps each old module (a package covers its submodules) to its new home and a
finder on ``sys.meta_path`` (installed by ``import safekd``) imports the new module and registers it under the old
name as well, so ``import safekd.distiller`` gives the *same module object* as ``import safekd.training.distiller``
(patching one patches the other; classes keep one ``__module__``, the new one). Nothing is imported until an old
path is asked for.

Two old modules gave their names to the new packages (``safekd.spec`` and ``safekd.targets``): those packages
find the old module's names in its new home (:data:`MOVED_INTO_PACKAGE`, :func:`forwarding`), so
``from safekd.spec import Spec`` and ``from safekd.targets import Targets`` keep working.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["ALIASES", "MOVED_INTO_PACKAGE", "new_name", "install", "forwarding"]

#: old module path → new module path (an old package's submodules follow it: ``safekd.weighting.token``).
ALIASES: dict[str, str] = {
    # what a user declares
    "safekd.constraints": "safekd.spec.constraints",
    "safekd.unsafe": "safekd.spec.unsafe",
    # how the target is built
    "safekd.signals": "safekd.targets.signals",
    "safekd.weighting": "safekd.targets.weighting",
    "safekd.pooling": "safekd.targets.pooling",
    "safekd.divergences": "safekd.targets.divergences",
    "safekd.vocab": "safekd.targets.vocab",
    "safekd.sparse": "safekd.targets.sparse",
    "safekd.teachers": "safekd.targets.teachers",
    "safekd.head": "safekd.targets.head",
    "safekd.cache": "safekd.targets.cache",
    "safekd.axioms": "safekd.targets.axioms",
    # how the student is trained
    "safekd.distiller": "safekd.training.distiller",
    "safekd.lagrangian": "safekd.training.lagrangian",
    "safekd.dual": "safekd.training.dual",
    "safekd.checkpoint": "safekd.training.checkpoint",
    "safekd.steplog": "safekd.training.steplog",
    # the floor every layer stands on
    "safekd.batches": "safekd.common.batches",
    "safekd.distributed": "safekd.common.distributed",
    "safekd.measurement": "safekd.common.measurement",
    "safekd.references": "safekd.common.references",
}

#: old module whose path is now a package → the module that holds its names.
MOVED_INTO_PACKAGE: dict[str, str] = {
    "safekd.spec": "safekd.spec.document",
    "safekd.targets": "safekd.targets.pipeline",
}


def new_name(old: str) -> str | None:
    """The layered path of ``old`` (a path of the flat layout), or None when ``old`` did not move."""
    for before, after in ALIASES.items():
        if old == before or old.startswith(before + "."):
            return after + old[len(before):]
    return None


class _AliasLoader:
    """Loads an old path as the module already (or now) imported under its new path."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system just set the alias's spec on the module: give it back its own (it ran already)
        module.__spec__ = self.own_spec


class _AliasFinder:
    """Finds the old paths of :data:`ALIASES` (first on ``sys.meta_path``, so an old package's submodules are
    never loaded a second time from the new package's directory)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("safekd."):
            return None
        new = new_name(fullname)
        return None if new is None else importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put the finder of the old paths first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())


def forwarding(package: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package that took the path of an old module: names that are not
    submodules of the package are looked up in the module that now holds them (:data:`MOVED_INTO_PACKAGE`)."""
    holder = MOVED_INTO_PACKAGE[package]

    def __getattr__(name: str) -> Any:
        if not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is None:
            module = importlib.import_module(holder)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(dir(importlib.import_module(holder))))

    return __getattr__, __dir__
