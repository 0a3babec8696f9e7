"""Griffe extension for the docs site.

* A Google-style ``Example:`` section is rendered as ``Examples:``. Griffe's Google parser knows only the plural
  title; under the singular one the doctest lines would be read as Markdown, where ``x[0]["key"]`` looks like a
  cross-reference. Renaming the title renders them as code.
* A method that overrides a documented base-class method without a docstring of its own shows the base
  docstring, as ``inspect.getdoc`` and ``help()`` do.
* A default that is a private module constant (``target=_UNDECLARED``) shows the constant's ``repr``
  (``Undeclared()``), as ``help()`` does: the reader cannot use the private name.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from griffe import Class, Docstring, Extension, Function, Module, Object

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.M)
_PRIVATE = re.compile(r"^_[A-Za-z]\w*$")


def _inherit(cls: Class) -> None:
    for name, member in cls.members.items():
        if member.is_alias or member.docstring is not None or name.startswith("_"):
            continue
        for base in cls.mro():
            inherited = base.members.get(name)
            if inherited is not None and not inherited.is_alias and inherited.docstring is not None:
                doc = inherited.docstring
                member.docstring = Docstring(doc.value, parent=member, parser=doc.parser)
                break


def _walk(obj: Object) -> None:
    for member in obj.members.values():
        if member.is_alias:
            continue
        if isinstance(member, Class):
            _inherit(member)
            _walk(member)
        elif isinstance(member, Module):
            _walk(member)


class DocstringFixes(Extension):
    """Rename ``Example:`` titles to ``Examples:`` and let undocumented overrides show the base docstring."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        """Rewrite the docstring of ``obj`` before it is parsed."""
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        """Once the whole package is loaded (bases resolvable), copy docstrings down to undocumented overrides."""
        _walk(pkg)

    def on_function(self, *, func: Function, **kwargs: Any) -> None:
        """Show private constants used as defaults by their ``repr``."""
        for param in func.parameters:
            if param.default is not None and _PRIVATE.match(str(param.default)):
                value = getattr(importlib.import_module(func.module.path), str(param.default))
                param.default = repr(value)
