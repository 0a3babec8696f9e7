"""Regenerate docs/api.md from the public docstrings: ``python docs/gen_api.py``."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import recm_opt


def render(name: str, module: object = recm_opt) -> str:
    """Return the markdown section of one public name: signature, kind, module, docstring."""
    obj = getattr(module, name)
    if not callable(obj):
        return f"## `{name}`\n\n`{obj!r}`\n"
    try:
        sig = re.sub(r" at 0x[0-9a-f]+", "", str(inspect.signature(obj)))  # stable across runs
    except (TypeError, ValueError):
        sig = "(...)"
    kind = "class" if inspect.isclass(obj) else "function"
    doc = inspect.getdoc(obj) or ""
    return f"## `{name}{sig}`\n\n*{kind}, `{obj.__module__}`*\n\n```text\n{doc}\n```\n"


def main() -> str:
    """Return the whole page."""
    parts = ["# API reference\n\nGenerated from the docstrings by `python docs/gen_api.py`; do not edit by hand.\n"]
    parts += [render(n) for n in recm_opt.__all__]
    for sub in (recm_opt.diagnostics, recm_opt.policies):
        parts.append(f"# `{sub.__name__}`\n")
        parts += [render(n, sub) for n in sub.__all__]
    return "\n".join(parts)


if __name__ == "__main__":
    Path(__file__).with_name("api.md").write_text(main())
