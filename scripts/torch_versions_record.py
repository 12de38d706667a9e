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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the one JUnit reader: gpu_check_report

from gpu_check_report import collect_tests  # noqa: E402


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
    figures, _ = collect_tests(args.junit)
    counts = {k: figures[k] for k in ("tests", "passed", "failures", "errors", "skipped")}
    bad = [f["test"] for f in figures["failed"]]
    paths = [a for a in args.command.split()[2:] if not a.startswith("-")]
    entry = {**_versions(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "command": args.command, "scope": "subset: " + " ".join(paths) if paths else "whole CPU suite",
             "pytest_exit": args.rc, **counts, "failing": bad[:50]}
    records = json.loads(args.out.read_text()) if args.out.is_file() else {}
    records.setdefault(args.version, {})[entry["scope"]] = entry  # the last run per version and scope
    args.out.write_text(json.dumps(dict(sorted(records.items())), indent=1) + "\n")
    print(f"torch {entry['torch']}: {counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
          f"{counts['skipped']} skipped ({entry['scope']}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
