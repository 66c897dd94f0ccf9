"""stnbench-report DIR [DIR ...] [--out OUT]: the error table of every run below some folders."""

import argparse
import sys
from pathlib import Path

from stnbench.cli import run

PROG = "stnbench-report"


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read every metrics.json below the folders (single runs and sweeps mixed) "
        "and write the error table in the paper's layout: table.csv, table.md, table.tex "
        "(booktabs) and runs.csv; where runs logged validations, curves.csv and curves.png; "
        "where learning rates differ, also table_lr.csv, table_lr.md and lr.png. Cells: mean +- "
        "std of the final test error over the runs that ended ok, their number, the runs that "
        "collapsed, diverged, failed or are unfinished, the paper's number and the difference.",
    )
    parser.add_argument(
        "dirs", nargs="+", metavar="DIR", help="folders of runs, or a runs.csv it wrote"
    )
    parser.add_argument(
        "--out", type=Path, help="where the files go (default: DIR/report, the first DIR)"
    )
    args = parser.parse_args()
    out = args.out or Path(args.dirs[0]) / "report"
    unreadable = []

    def body():
        from stnbench import report

        runs = report.collect(args.dirs)
        unreadable.extend(runs.attrs["unreadable"])
        for warning in report.warnings(runs):
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        written = report.write(runs, out)
        counts = runs.status.value_counts()
        summary = ", ".join(f"{counts[s]} {s}" for s in report.STATUSES if s in counts)
        twins = len(runs.attrs["duplicates"])
        print(
            f"{len(runs)} runs ({summary})" + (f"; {twins} duplicates set aside" if twins else "")
        )
        print()
        print((out / "table.md").read_text())
        print("wrote " + ", ".join(str(p) for p in written))

    code = run(PROG, body)
    return code or (1 if unreadable else 0)  # the tables are written, but not from every run


if __name__ == "__main__":
    sys.exit(main())
