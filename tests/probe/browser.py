"""Headless Chromium for report tests: load a page with a checking script and read back what it found."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed and scripts/setup.sh could not install it "
                    "(needs root and apt-get): `apt-get install -y chromium`")
    return exe


def check_page(page: str, check_script: str, tmp_path) -> tuple[dict, subprocess.CompletedProcess]:
    """Load ``page`` with ``check_script`` first in its head; the JSON the script writes into
    ``<pre id="loka-check">`` on load, and Chromium's run (its stderr has the console)."""
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("<head>", "<head>" + check_script, 1))
    run = subprocess.run([chromium(), *FLAGS, "--virtual-time-budget=5000", "--dump-dom", checked.as_uri()],
                         capture_output=True, text=True, timeout=3600)  # hang guard only
    m = re.search(r'<pre id="loka-check">(.*?)</pre>', run.stdout, re.S)
    assert m, f"chromium did not finish loading the page:\n{run.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&")), run
