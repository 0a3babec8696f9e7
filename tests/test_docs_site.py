"""The documentation site builds with warnings as errors, and its API reference covers the public surface."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import recm_opt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def api_html(tmp_path_factory) -> str:
    """Build the site once with ``mkdocs build --strict`` into a temporary directory; return the API page."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return (site / "api" / "index.html").read_text()


def _anchors(html: str) -> set[str]:
    return set(re.findall(r'id="(recm_opt[^"]*)"', html))


def test_strict_build_documents_every_public_name(api_html):
    """Every name in recm_opt.__all__ has its own entry in the generated reference."""
    anchors = _anchors(api_html)
    missing = [n for n in recm_opt.__all__ if not ({f"recm_opt.{n}", f"recm_opt.export.{n}"} & anchors)]
    assert not missing, f"public names without an API entry: {missing}"


def test_every_public_method_of_the_optimizer_is_documented(api_html):
    """observe, step, state_dict, load_state_dict, report and every other public method have an entry."""
    anchors = _anchors(api_html)
    methods = [n for n, v in vars(recm_opt.RECMOptimizer).items()
               if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))]
    assert {"observe", "step", "state_dict", "load_state_dict", "report"} <= set(methods)
    missing = [m for m in methods if f"recm_opt.RECMOptimizer.{m}" not in anchors]
    assert not missing, f"RECMOptimizer methods without an API entry (give them a docstring): {missing}"


def test_every_public_class_has_its_methods_documented(api_html):
    """Each public class in __all__ shows its public methods (those with a docstring, as the site renders)."""
    anchors = _anchors(api_html)
    missing = []
    for name in recm_opt.__all__:
        obj = getattr(recm_opt, name)
        if not inspect.isclass(obj):
            continue
        for meth, value in vars(obj).items():
            if not meth.startswith("_") and inspect.isfunction(value) and f"recm_opt.{name}.{meth}" not in anchors:
                missing.append(f"{name}.{meth}")
    assert not missing, f"public methods without an API entry (give them a docstring): {missing}"
