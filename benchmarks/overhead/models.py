"""The models the overhead benchmarks time, imported without touching ``sys.path``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (examples/ is a folder of scripts, not a package)."""
    key = f"recm_examples_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "examples" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_vector = _example("vector_model")
RelaxedVectorLinear: Any = _vector.RelaxedVectorLinear
VectorGate: Any = _vector.VectorGate
make_task: Any = _vector.make_task


def egnn_modules() -> tuple[ModuleType, ModuleType]:
    """The EGNN model module and the N-body data module."""
    layouts = (("benchmarks.models.egnn", "benchmarks.nbody.data"), ("benchmarks.egnn", "benchmarks.nbody_data"))
    for model, data in layouts:
        try:
            return importlib.import_module(model), importlib.import_module(data)
        except ImportError:
            continue
    # The N-body scripts still import each other as top-level modules.
    sys.modules.setdefault("nbody_data", importlib.import_module("benchmarks.nbody_data"))
    return importlib.import_module("benchmarks.egnn"), sys.modules["nbody_data"]
