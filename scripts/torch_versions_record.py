"""Record one run of scripts/test_torch.sh in tests/torch_versions.json (the last run per torch version and scope).

Reads pytest's JUnit XML; writes the counts, the torch/triton versions the run imported, the date, the
command and which paths ran (a subset is recorded as one, never as the whole suite), and the ids of
the failing tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def junit_counts(path: Path) -> tuple[dict, list[str]]:
    """(counts {tests, passed, failed, errors, skipped, seconds}, ids of failed or erroring tests)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0, "seconds": 0.0}
    for s in suites:
        counts["tests"] += int(s.get("tests", 0))
        counts["failed"] += int(s.get("failures", 0))
        counts["errors"] += int(s.get("errors", 0))
        counts["skipped"] += int(s.get("skipped", 0))
        counts["seconds"] += float(s.get("time", 0.0))
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = round(counts["seconds"], 1)
    bad = [f"{case.get('classname', '')}::{case.get('name', '')}" for case in root.iter("testcase")
           if case.find("failure") is not None or case.find("error") is not None]
    return counts, bad


def _versions() -> dict:
    import torch  # the side environment's own torch: this script runs with its python

    out = {"torch": torch.__version__}
    try:
        import triton  # optional: present with torch's CUDA builds

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--junit", type=Path, required=True)
    p.add_argument("--version", required=True, help="the VERSION given to test_torch.sh")
    p.add_argument("--rc", type=int, required=True, help="pytest's exit status")
    p.add_argument("--command", required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not args.junit.is_file() or args.junit.stat().st_size == 0:
        print(f"torch_versions_record: no JUnit report at {args.junit} (pytest did not start?)", file=sys.stderr)
        return 2
    counts, bad = junit_counts(args.junit)
    paths = [a for a in args.command.split()[2:] if not a.startswith("-")]
    entry = {**_versions(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "command": args.command, "scope": "subset: " + " ".join(paths) if paths else "whole CPU suite",
             "pytest_exit": args.rc, **counts, "failing": bad[:50]}
    records = json.loads(args.out.read_text()) if args.out.is_file() else {}
    records.setdefault(args.version, {})[entry["scope"]] = entry  # the last run per version and scope
    args.out.write_text(json.dumps(dict(sorted(records.items())), indent=1) + "\n")
    print(f"torch {entry['torch']}: {counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
          f"{counts['skipped']} skipped ({entry['scope']}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
