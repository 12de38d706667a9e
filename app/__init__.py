"""loka.app (top layer): what a person runs — the ``loka`` command line (``cli``) and the demo (``demo``).

Nothing below imports it. ``python -m loka.app`` is the ``loka`` command.
"""
