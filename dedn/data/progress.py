"""Progress callbacks for the long-running data commands (convert, synth).

A ``Progress`` wraps an iterator of chunks: ``progress(chunks, total, desc)`` yields the same chunks,
reporting as it goes. ``no_progress`` reports nothing; ``tqdm_progress`` draws a tqdm bar.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Progress = Callable[[Iterator[Any], int, str], Iterator[Any]]


def no_progress(it: Iterator[Any], total: int, desc: str) -> Iterator[Any]:
    return it


def tqdm_progress(it: Iterator[Any], total: int, desc: str) -> Iterator[Any]:
    from tqdm import tqdm

    return iter(tqdm(it, total=total, desc=desc, unit="chunk", leave=False))


__all__ = ["Progress", "no_progress", "tqdm_progress"]
