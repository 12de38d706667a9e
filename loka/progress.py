"""Progress on long work: a tqdm bar where tqdm is installed, plain lines where it is not.

loka's core needs only torch, numpy and scipy (the lent GPU machine has nothing more), so every
progress bar goes through :func:`progress_bar`: with tqdm it is ``tqdm.auto.tqdm``; without it a
small stand-in with the same calls (iterate, ``update``, ``set_postfix``, ``write``, ``close``, a
``with`` block) prints one line to stderr about every tenth of the work and at the end.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             disable: bool = False, **kwargs):
    """``tqdm(iterable, total=..., desc=..., disable=..., **kwargs)``, or plain lines without tqdm."""
    if importlib.util.find_spec("tqdm") is not None:
        from tqdm.auto import tqdm  # optional: tqdm draws the bar when installed

        return tqdm(iterable, total=total, desc=desc, disable=disable, **kwargs)
    return PlainProgress(iterable, total=total, desc=desc, disable=disable, initial=kwargs.get("initial", 0))


class PlainProgress:
    """tqdm's calls loka uses, as lines on stderr: ``desc: n/total key=value``."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 disable: bool = False, initial: int = 0) -> None:
        self.iterable, self.desc, self.disable, self.n = iterable, desc or "progress", disable, initial
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self._postfix = ""
        self._every = max(1, -(-(total or 0) // 10))  # a tenth, rounded up: at most 10 lines and the last
        self._last = initial

    def __iter__(self):
        for item in self.iterable if self.iterable is not None else ():
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self._last >= self._every or (self.total is not None and self.n >= self.total):
            self._last = self.n
            self._line()

    def set_postfix(self, **values) -> None:
        self._postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def write(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.n != self._last:
            self._last = self.n
            self._line()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self) -> None:
        if self.disable:
            return
        of = f"/{self.total}" if self.total is not None else ""
        print(f"{self.desc}: {self.n}{of}{' ' + self._postfix if self._postfix else ''}", file=sys.stderr, flush=True)
