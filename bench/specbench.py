"""Spec-Bench end to end: AR, vanilla SD and Mirror-SD per task family (same as ``mirror-rt bench``).

    python bench/specbench.py /work/shared/data/spec_bench/question.jsonl --limit 1 --max-new-tokens 32

The code lives in the package (mirror_rt.bench_cli, mirror_rt.specbench, mirror_rt.specbench_report)
so an installed wheel runs it too; this script only parses the arguments. See ``--help``.
"""
from __future__ import annotations

import argparse
import sys

from mirror_rt.bench_cli import add_bench_args, cmd_bench
from mirror_rt.cli import USER_ERRORS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="specbench.py", description=__doc__.splitlines()[0])
    add_bench_args(parser)
    args = parser.parse_args(argv)
    try:
        cmd_bench(args)
    except USER_ERRORS as e:
        print(f"specbench.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
