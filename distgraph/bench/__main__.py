"""`python -m distgraph.bench [NAME ...] [--quick] [--json]`: the suite without the distgraph CLI."""

from __future__ import annotations

import argparse
import sys

from ..errors import DistgraphError
from . import NAMES, format_table, run, to_json


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the benchmarks, print a table or JSON; 1 if any failed to run.

    Missing peers (the ``bench`` extra) end the run before it starts with one error line and
    exit code 2, as ``distgraph bench`` does.
    """
    parser = argparse.ArgumentParser(prog="python -m distgraph.bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(NAMES)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, for tests")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    bad = [n for n in args.names if n not in NAMES]
    if bad:
        parser.error(f"unknown benchmark(s): {', '.join(bad)}")
    try:
        results = run(args.names or None, quick=args.quick, progress=not args.json)
    except DistgraphError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(to_json(results) if args.json else format_table(results))
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
