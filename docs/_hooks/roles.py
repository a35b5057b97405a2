"""MkDocs hook: Sphinx-style roles left in docstrings (``:class:`~safekd.spec.Spec```) render as inline code
(``Spec``; the full path without ``~``) instead of showing the role's name."""
from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):<code>(~?)([^<]+)</code>")


def _short(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if match.group(1) else target}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    """Rewrite the roles in a rendered page."""
    return _ROLE.sub(_short, html)
