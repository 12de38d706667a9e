"""A wall-clock limit on one benchmark variant, so a variant that takes too long is a row, not a hang.

POSIX ``SIGALRM`` in the main thread: the alarm interrupts the variant at its next Python
bytecode (a long C++ compile of a generated kernel finishes first), and the variant's row
says it ran past the limit; the other variants still run.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class VariantTimeout(RuntimeError):
    """The variant ran past ``--variant-timeout``."""


@contextlib.contextmanager
def time_limit(seconds: float | None, name: str, option: str = "--variant-timeout"):
    """Raise :class:`VariantTimeout` in the body after ``seconds`` (None: no limit); ``option`` names the flag."""
    if not seconds:
        yield
        return
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        raise RuntimeError("--variant-timeout needs POSIX signals in the main thread; run without it")

    def on_alarm(_signum, _frame):
        raise VariantTimeout(f"{name} did not finish within {seconds:g} s ({option})")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
