"""Serving is an extra: ``pip install 'loka[serve]'`` brings uvicorn, h11 and pydantic.

Nothing else in loka needs them (the lent GPU machine has none of them), so ``loka.models.serve``
and ``loka.models.serving_schema`` are imported only by the commands that serve, after
:func:`require_serve` has said in one line what is missing and how to install it.
"""

from __future__ import annotations

import importlib.util

SERVE_MODULES = ("uvicorn", "h11", "pydantic")


def require_serve(what: str) -> None:
    """Raise ``ValueError`` naming the install command when a module serving needs is missing."""
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{what} needs the serving extra ({', '.join(missing)} not installed): "
                         "pip install 'loka[serve]'")
