"""The one JSON codec of loka's files (probe report, plan, gate result).

The files are strict JSON, so a non-finite float (an error that overflowed, a speedup
never measured) is written as the string ``"inf"``, ``"-inf"`` or ``"nan"`` and read back
as the float. :func:`read_json` turns every way a file can fail to be JSON (unreadable,
not UTF-8, malformed, nested deeper than the parser's recursion limit) into one
``ValueError`` line naming the file, never a traceback; the schema checks of each
format (``loka.probe.schema``, ``loka.dispatch.plans``) come after it.
"""

from __future__ import annotations

import json
import math
import os

NON_FINITE = ("inf", "-inf", "nan")


def encode_floats(obj):
    """Replace non-finite floats by ``"inf"`` / ``"-inf"`` / ``"nan"`` (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: encode_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_floats(v) for v in obj]
    return obj


def decode_floats(obj):
    """Inverse of :func:`encode_floats`."""
    if isinstance(obj, str) and obj in NON_FINITE:
        return float(obj)
    if isinstance(obj, dict):
        return {k: decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_floats(v) for v in obj]
    return obj


def dumps(obj, **options) -> str:
    """Strict JSON of ``obj`` with non-finite floats encoded (``options`` go to ``json.dumps``)."""
    return json.dumps(encode_floats(obj), allow_nan=False, **options)


def loads(text: str, what: str, error: type[ValueError] = ValueError, hint: str = ""):
    """The JSON document in ``text`` (non-finite strings still encoded); ``error`` naming ``what`` if it is
    not JSON (``hint`` appended: what to do about it)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what}: not valid JSON ({exc}){hint}") from None
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply to be a loka file{hint}") from None


def read_json(path: str | os.PathLike, what: str, error: type[ValueError] = ValueError):
    """:func:`loads` of the file at ``path``; ``error`` naming it when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file; pass the path of one loka wrote") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read this {what} file ({exc}); pass the {what} file loka wrote") from None
    return loads(text, f"{path}", error, hint=f"; is it the {what} file loka wrote?")
