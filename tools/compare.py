"""Tabulate finished and running experiments: ``python tools/compare.py RUN_DIR... [--csv F] [--plot F.png]``.

Each RUN_DIR is a run folder (holding ``worklog.txt``) of this project, upstream mdistiller or CAT-KD,
or a folder above run folders (``output/``). Prints a Markdown table: best and last top-1 per method
and teacher/student pair, mean ± std over runs that share a config (seeds), and the difference to
the student trained from scratch when that run is among them.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

from mdistiller_lakd.analysis.figures import plot_accuracy_curves
from mdistiller_lakd.analysis.plotting import MissingExtraError, pyplot, save_figure
from mdistiller_lakd.analysis.runs import csv_records, group_runs, markdown_table, read_runs, summary_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or folders above them")
    parser.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the test-accuracy curves (needs matplotlib)")
    args = parser.parse_args(argv)

    if args.plot:
        try:
            pyplot()
        except MissingExtraError as error:
            print(f"error: --plot: {error}", file=sys.stderr)
            return 2
    runs, skipped = read_runs(args.run_dirs)
    for message in skipped:
        print(f"skipped {message}", file=sys.stderr)
    for run in runs:
        for message in run.warnings:
            print(f"warning: {run.path}: {message}", file=sys.stderr)
    if not runs:
        print("error: no readable run among the given folders", file=sys.stderr)
        return 1

    rows = summary_rows(group_runs(runs))
    print(markdown_table(rows))
    if args.csv:
        records = csv_records(rows)
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    if args.plot:
        save_figure(plot_accuracy_curves(runs), args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
