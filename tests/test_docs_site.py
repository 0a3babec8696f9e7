"""The documentation site builds with warnings as errors, works opened from disk, and its API reference covers the
public surface with whole signatures and no private names."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import recm_opt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Build the site once with ``mkdocs build --strict`` into a temporary directory."""
    pytest.importorskip("mkdocs", reason="needs the docs extra: pip install '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="needs the docs extra: pip install '.[docs]'")
    pytest.importorskip("pymdownx", reason="needs the docs extra: pip install '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def api_html(site) -> str:
    """The API reference page."""
    return (site / "api.html").read_text()


def _pages(site: Path) -> list[Path]:
    return [p for p in site.rglob("*.html") if p.name != "404.html"]


def test_site_loads_nothing_from_the_network(site):
    """No page loads a script, stylesheet or image from another host: the site works offline."""
    remote = []
    for page in _pages(site):
        html = page.read_text()
        for tag in re.findall(r"<(?:script|link|img)\b[^>]*>", html):
            if re.search(r'(?:src|href)="(?:https?:)?//', tag):
                remote.append(f"{page.relative_to(site)}: {tag}")
    assert not remote, "\n".join(remote[:10])


def test_every_internal_link_opens_a_file_from_disk(site):
    """Every relative link of every page names an existing file (a folder URL would show a directory listing)."""
    broken = []
    for page in _pages(site):
        for href in re.findall(r'href="([^"#]*)(?:#[^"]*)?"', page.read_text()):
            if not href or re.match(r"[a-z]+:", href):
                continue
            target = (page.parent / href).resolve()
            if not target.is_file():
                broken.append(f"{page.relative_to(site)} -> {href}")
    assert not broken, "\n".join(sorted(set(broken))[:20])


def test_code_blocks_are_highlighted_at_build_time(site):
    """Code is highlighted by Pygments when the site is built (no highlight.js), with a local stylesheet."""
    guide = (site / "guide.html").read_text()
    assert '<div class="highlight">' in guide and '<span class="k">' in guide
    assert "highlight.js" not in guide and "hljs" not in guide
    css = (site / "css" / "site.css").read_text()
    assert ".highlight .k" in css


def test_api_signatures_are_whole_and_show_no_private_names(api_html):
    """The optimizer's signature lists every argument, and no private default (``_UNDECLARED``) appears."""
    text = re.sub(r"<[^>]+>", "", api_html)
    for arg in inspect.signature(recm_opt.RECMOptimizer).parameters:
        assert f"{arg}:" in text or f"{arg}=" in text, arg
    assert "_UNDECLARED" not in text


def test_sidebar_lists_the_methods(api_html):
    """The page's table of contents (the sidebar, not the headings' permalinks) links each method of the optimizer."""
    sidebar = api_html[api_html.index("bs-sidebar"):api_html.index('role="main"')]
    for meth in ("step", "observe", "state_dict", "report"):
        assert f'href="#recm_opt.RECMOptimizer.{meth}"' in sidebar, meth


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
        fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
        for meth, value in vars(obj).items():
            if meth in fields:  # a dataclass field whose default is a function (RECMConfig.beta_fn), not a method
                continue
            if getattr(value, "hooked", False):  # torch's Optimizer re-wraps a subclass's inherited step per class
                continue
            if not meth.startswith("_") and inspect.isfunction(value) and f"recm_opt.{name}.{meth}" not in anchors:
                missing.append(f"{name}.{meth}")
    assert not missing, f"public methods without an API entry (give them a docstring): {missing}"


def test_result_figures_are_shown_inline(site):
    """Every figure of docs/ that a page refers to is shown as an image, not only linked."""
    linked, shown = set(), set()
    for page in _pages(site):
        html = page.read_text()
        linked |= {(page.parent / h).resolve() for h in re.findall(r'<a [^>]*href="([^"#]+\.png)"', html)}
        shown |= {(page.parent / h).resolve() for h in re.findall(r'<img [^>]*src="([^"]+\.png)"', html)}
    assert shown, "no figure is shown"
    assert not sorted(linked - shown), f"figures only linked: {sorted(str(p) for p in linked - shown)}"
