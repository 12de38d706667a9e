"""``python -m loka.app`` runs the ``loka`` command (the same as the installed script)."""

import sys

from loka.app.cli import main

sys.exit(main())
