"""Packaging laws: the wheel installs in a clean venv with its declared dependencies only and runs the README
snippet there; the sdist ships no half test tree; the `test` extra covers every third-party import of the tests."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TORCH_PIN = "torch==2.13.0"  # always exact: an unpinned torch pulls a multi-GB CUDA build
SOURCES = ["pyproject.toml", "setup.cfg", "README.md", "LICENSE", "MANIFEST.in", "recm_opt", "docs", "mkdocs.yml"]


def _source_copy(dest: Path) -> Path:
    """The files a build reads, copied so that building leaves no build/ or egg-info in the checkout."""
    src = dest / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif path.exists():
            shutil.copy2(path, src / name)
    return src


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _readme_snippet() -> str:
    usage = (ROOT / "README.md").read_text().split("## Usage", 1)[1]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_version_has_one_source():
    """The version is read from recm_opt.__version__ by the build, not written twice."""
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "recm_opt.__version__"}


def test_license_is_an_spdx_expression_with_its_file():
    """license is the SPDX string "MIT", the LICENSE file exists, and the build backend is new enough for it."""
    project = PYPROJECT["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]


def _third_party_imports() -> tuple[set[str], dict[str, str]]:
    """Top-level third-party modules the tests and benchmarks import: plain imports, and importorskip -> reason."""
    local = {"recm_opt", "benchmarks", "tests"} | {p.stem for p in ROOT.glob("tests/**/*.py")}
    local |= {p.stem for p in ROOT.glob("benchmarks/**/*.py")} | {p.stem for p in ROOT.glob("examples/*.py")}
    local |= {p.name for p in ROOT.glob("benchmarks/*/") if p.is_dir()}
    plain: set[str] = set()
    skipped: dict[str, str] = {}
    for path in [*ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/**/*.py")]:
        tree = ast.parse(path.read_text())
        optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and _catches_import_error(t)
                    for stmt in t.body for n in ast.walk(stmt)}  # `try: import tqdm / except ImportError:`
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                plain |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                plain.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip":
                reason = next((k.value for k in node.keywords if k.arg == "reason"), None)
                text = reason.value if isinstance(reason, ast.Constant) else ast.unparse(reason) if reason else ""
                skipped.setdefault(node.args[0].value.split(".")[0], text)

    def keep(m: str) -> bool:
        return m not in local and m not in sys.stdlib_module_names and m != "__future__"

    return {m for m in plain if keep(m)}, {m: r for m, r in skipped.items() if keep(m)}


def _catches_import_error(node: ast.Try) -> bool:
    names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
    return bool(names & {"ImportError", "ModuleNotFoundError", "(ImportError, ModuleNotFoundError)"})


def _distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in metadata.packages_distributions().get(module, [module])}


def test_test_extra_covers_every_third_party_import_of_the_tests():
    """`pip install ".[test]"` runs the whole suite: every third-party module the tests (and the benchmark modules
    they load) import is in the test extra, except modules of another extra that a test takes through
    `pytest.importorskip(..., reason=...)` whose reason names that extra, so that the test skips and says why, and
    optional imports guarded by `except ImportError` (tqdm for progress bars)."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared = {_dist_name(r) for r in PYPROJECT["project"]["dependencies"] + extras["test"]}
    plain, skipped = _third_party_imports()
    missing = []
    for module in sorted(plain | set(skipped)):
        if _distributions(module) & declared:
            continue
        reason = skipped.get(module) if module not in plain else None
        named = [name for name in extras if reason is not None and f".[{name}]" in reason]
        if module in metadata.packages_distributions():  # installed: the named extra must declare it
            named = [n for n in named if _distributions(module) & {_dist_name(r) for r in extras[n]}]
        if not named:
            missing.append(f"{module} (skip reason {reason!r})")
    assert not missing, f"imported by tests but neither in the test extra nor skipped naming its extra: {missing}"


def test_sdist_ships_no_partial_test_tree(tmp_path):
    """The sdist carries the library, LICENSE and every file the docs site is built from (pages, figures,
    stylesheet, the griffe extension, mkdocs.yml), and no tests/ (which need the clone's fixtures)."""
    pytest.importorskip("build")
    src = _source_copy(tmp_path)
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)])
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    assert "LICENSE" in names and "recm_opt/optimizer.py" in names and "mkdocs.yml" in names
    docs = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    assert not sorted(docs - set(names)), f"docs files the sdist lacks: {sorted(docs - set(names))}"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]


@pytest.mark.slow
def test_wheel_installs_in_a_clean_venv_and_runs_the_readme_snippet(tmp_path):
    """A venv without system packages gets the pinned torch, then the wheel with its declared dependencies only;
    the README usage snippet runs there against the installed package, not the checkout."""
    src = _source_copy(tmp_path)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "dist"), str(src)])
    (wheel,) = (tmp_path / "dist").glob("recm_opt-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", TORCH_PIN])
    _run([py, "-m", "pip", "install", "-q", str(wheel)])
    installed = _run([py, "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    assert "recm-opt==" in installed.replace("_", "-") and "scipy" not in installed and "numpy" not in installed
    (tmp_path / "snippet.py").write_text(
        "import recm_opt, pathlib\n"
        f"assert pathlib.Path(recm_opt.__file__).is_relative_to({str(venv)!r}), recm_opt.__file__\n"
        + _readme_snippet())
    out = _run([py, str(tmp_path / "snippet.py")], cwd=tmp_path, timeout=300).stdout
    assert "alpha" in out.lower(), out
