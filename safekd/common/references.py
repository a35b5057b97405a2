"""``"package.module:attr.path"`` references: import the object one names (job files, ``safekd check-axioms``)."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_reference"]


def import_reference(ref: str, *, context: str | None = None) -> Any:
    """The object at ``attr.path`` inside ``package.module`` for ``ref = "package.module:attr.path"``.

    Raises ValueError (prefixed with ``context``, e.g. ``"job.data"``, when given) if ``ref`` has no ``:``, the
    module does not import or an attribute on the path is missing.
    """
    prefix = f"{context}: " if context else ""
    if ":" not in ref:
        raise ValueError(f"{prefix}expected 'module:object', got {ref!r}")
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{prefix}cannot import module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{prefix}module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
