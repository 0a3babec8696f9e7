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


def test_test_extra_covers_every_third_party_import_of_the_tests():
    """Every top-level module the tests (and the benchmark modules they load) import is declared in test or docs."""
    declared = {_dist_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared |= {_dist_name(r) for r in extras["test"] + extras["docs"]}  # `make test` installs both
    local = {"recm_opt", "benchmarks", "tests"} | {p.stem for p in ROOT.glob("tests/**/*.py")}
    local |= {p.stem for p in ROOT.glob("benchmarks/**/*.py")} | {p.stem for p in ROOT.glob("examples/*.py")}
    local |= {p.name for p in ROOT.glob("benchmarks/*/") if p.is_dir()}
    modules: set[str] = set()
    for path in [*ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip":
                modules.add(node.args[0].value.split(".")[0])
    third_party = sorted(m for m in modules - local if m not in sys.stdlib_module_names and m != "__future__")
    dists = metadata.packages_distributions()
    missing = []
    for module in third_party:
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} (distribution {sorted(names)})")
    assert not missing, f"imported by tests but not in the test extra: {missing}"


def test_sdist_ships_no_partial_test_tree(tmp_path):
    """The sdist carries the library, LICENSE and docs, and no tests/ (which need the clone's fixtures)."""
    pytest.importorskip("build")
    src = _source_copy(tmp_path)
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)])
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    assert "LICENSE" in names and "recm_opt/optimizer.py" in names and "docs/guide.md" in names
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
