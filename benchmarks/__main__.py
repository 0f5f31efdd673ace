"""``python -m benchmarks``: run the performance suites, print a table per suite, write one JSON each.

Training runs first so that the pipeline suite can compare the cached loader with what SMAT
meta-training consumes in the same run. ``--quick`` fits in about 10 minutes on an idle 2-core CPU;
on a GPU every suite times on it (``--device`` chooses; ``--device cuda`` without CUDA exits with status 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import SUITES
from benchmarks._common import DEVICES, MODES, configure_threads, device, print_table, use_device, write_json


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the CPU budget: about 10 minutes in all")
    p.add_argument("--mode", choices=MODES, help="smoke (seconds, for tests), quick or full; overrides --quick")
    p.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--out", default="benchmarks/results", help="folder for <suite>.json (and scaling.png)")
    p.add_argument("--workdir", help="pipeline: its generated data (default: $METABENCH_CACHE/benchmark-data)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 on a busy machine, else torch's)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a target fails")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the suites time: auto (the GPU when there is one), cpu or cuda")
    args = p.parse_args(argv)
    args.suites = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        p.error(f'unknown suite "{unknown[0]}"; choose from {", ".join(SUITES)}')
    args.suites = [s for s in SUITES if s in args.suites]  # training first: the pipeline reads its result
    args.mode = args.mode or ("quick" if args.quick else "full")
    return args


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run the chosen suites; returns their results by name (each also written as JSON)."""
    reason = configure_threads(args.threads)
    out, started, context = Path(args.out), time.perf_counter(), {}
    print(f"benchmarks: {', '.join(args.suites)} in {args.mode} mode on {device()}; torch threads: {reason}",
          flush=True)
    for suite in args.suites:
        module = importlib.import_module(f"benchmarks.{suite}")
        extra = {"workdir": Path(args.workdir) if args.workdir else None} if suite == "pipeline" else {}
        result = module.run(args.mode, out, context=context, **extra)
        context[suite] = result
        module.report(result)
        print(f"wrote {write_json(out / f'{suite}.json', result)} ({result['seconds']:.0f} s)", flush=True)
    rows = [[t["name"] if len(t["name"]) < 70 else t["name"][:67] + "...", suite,
             {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]n/a[/]"}[t["passed"]]]
            for suite, r in context.items() for t in r["targets"]]
    print_table(f"all targets ({time.perf_counter() - started:.0f} s)", ["target", "suite", ""], rows)
    return context


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        use_device(args.device)  # before any suite: children inherit it
    except ValueError as e:
        print(f"python -m benchmarks: {e}", file=sys.stderr)
        return 2
    results = run(args)
    failed = any(t["passed"] is False for r in results.values() for t in r["targets"])
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
