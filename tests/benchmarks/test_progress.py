"""Long benchmark runs say how long they take and show their progress."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from benchmarks import progress as progress_module

ROOT = Path(__file__).resolve().parents[2]


def _states_duration(source: str) -> bool:
    """An ``expected(...)`` epilog, or a --help that prints the whole module docstring, which gives a duration."""
    if "epilog=expected(" in source:
        return True
    doc = ast.get_docstring(ast.parse(source)) or ""
    return "description=__doc__," in source and bool(re.search(r"\b(minutes?|min|seconds|s)\b", doc))


def test_every_benchmark_command_states_its_duration_in_help() -> None:
    """Each benchmark script with an argument parser states its expected duration in --help."""
    scripts = [p for p in (ROOT / "benchmarks").rglob("*.py") if "ArgumentParser(" in p.read_text()]
    assert len(scripts) >= 10
    missing = [str(p.relative_to(ROOT)) for p in scripts if not _states_duration(p.read_text())]
    assert not missing, f"--help without an expected duration: {missing}"


def test_plain_progress_without_tqdm_prints_count_and_time_left(monkeypatch, capsys) -> None:
    """Without tqdm the bar is a line per tenth of the runs with the count, the elapsed time and the time left."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert list(progress_module.progress(range(20), desc="runs")) == list(range(20))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 10 and err[-1].startswith("runs: 20/20 [") and "s left]" in err[0]
    progress_module.write("a result")
    assert capsys.readouterr().out == "a result\n"
