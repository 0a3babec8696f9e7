"""Progress for long benchmark runs: the expected duration up front and a bar over runs and epochs.

The bar is tqdm's (the ``progress`` extra) on stderr, with a count and an ETA; without tqdm a plain
line with the same numbers is printed about every tenth of the runs. :func:`write` prints a result
line without breaking the bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def expected(duration: str) -> str:
    """The sentence that ``--help`` ends with (pass it as the parser's ``epilog``)."""
    return f"Expected duration: {duration}."


def announce(duration: str) -> None:
    """Print, before anything runs, how long the run is expected to take."""
    print(f"expected duration: {duration}; progress on stderr", flush=True)


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "runs", unit: str = "run",
             leave: bool = True) -> Iterable[T]:
    """``iterable`` with a progress bar: count, elapsed time and ETA."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, mininterval=1.0, file=sys.stderr,
                dynamic_ncols=True)


def write(line: str) -> None:
    """Print a result line above the progress bar (plain ``print`` without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(line, flush=True)
        return
    tqdm.write(line, file=sys.stdout)


def _plain(iterable: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    items: Any = iterable
    if total is None:
        items = list(iterable)
        total = len(items)
    start, every = time.perf_counter(), max(1, total // 10)
    for i, item in enumerate(items):
        yield item
        done = i + 1
        if done % every == 0 or done == total:
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (total - done)
            print(f"{desc}: {done}/{total} [{elapsed:.0f} s elapsed, about {eta:.0f} s left]", file=sys.stderr,
                  flush=True)
