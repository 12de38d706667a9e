"""The GPU check's `sharded` stage: the ranker with TorchRec-sharded tables and FSDP2 dense arches,
a few steps on one process of the device, where torchrec can be installed.

Where it cannot (no torchrec or no fbgemm build for this device), the stage writes why and
passes: the row says so instead of failing. Writes ``--json`` with what ran:

    python bench/gpu_check_sharded.py --device cuda --size tiny --steps 5 --json sharded.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def run(args) -> dict:
    from loka.models.torchrec_sparse import torchrec_missing

    missing = torchrec_missing()
    if missing is not None:
        return {"ran": False, "reason": f"not run: {missing}"}
    from loka.models.sharded_train import train_sharded
    from loka.models.sharding import ShardingConfig
    from loka.models.train import TrainConfig

    config = TrainConfig(size=args.size, steps=args.steps, batch_size=args.batch_size, device=args.device,
                         precision="fp32", progress=False)
    t0 = time.perf_counter()
    result = train_sharded(config, ShardingConfig(tables=args.tables), print_plan=True)
    return {"ran": True, "size": args.size, "steps": result.step, "tables": args.tables, "device": args.device,
            "losses": result.losses, "examples_per_s": result.examples_per_s, "wall_s": time.perf_counter() - t0}


def collect(work: Path) -> tuple[dict, list[str]]:
    """The row's figures and Markdown lines (bench/gpu_check.py)."""
    path = work / "sharded.json"
    if not path.exists():
        return {}, ["(bench/gpu_check_sharded.py wrote no result, see the log)"]
    r = json.loads(path.read_text())
    if not r["ran"]:
        return {**r, "summary": r["reason"]}, [f"- {r['reason']}"]
    r["summary"] = f"{r['steps']} steps, {r['tables']} tables + FSDP2, {r['examples_per_s']:,.0f} examples/s"
    return r, [f"- ranker `{r['size']}` on {r['device']}, one process: {r['steps']} steps, {r['tables']} tables "
               f"(fused row-wise Adagrad) + FSDP2 dense arches, losses {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, "
               f"{r['examples_per_s']:,.0f} examples/s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="tiny")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tables", default="row-wise", choices=("table-wise", "row-wise"))
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    result = run(args)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(result.get("reason") or f"sharded: {result['steps']} steps, {result['examples_per_s']:,.0f} examples/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
