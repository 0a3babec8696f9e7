"""Warnings that point at the user's line: the first frame outside recm_opt, torch and contextlib."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

_OURS = (str(Path(__file__).parent), str(Path(torch.__file__).parent), str(Path(contextlib.__file__).parent))


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with the ``stacklevel`` of the user's code that led here."""
    frame: Any = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_OURS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
