"""`python -m fastlocal.report DIR...`: the paper's rows found among run directories, measured against its numbers.

    python -m fastlocal.report runs/table4                      # a Markdown table
    python -m fastlocal.report runs/ --format csv --out results.csv

One line per paper row (Tables 1, 2, 4, 5; Table 6 from `fastlocal.evaluate` results on STL-10): the paper's
number, the measured final-epoch error over the seeds found (mean +- sample std, n), the difference, and every
way the runs' recipe differs from the paper's. Runs that are no paper row are listed below the table. The
matching rules: fastlocal/paper.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastlocal.config import UserError, exits_2_on_user_error

USAGE_EXAMPLES = """examples:
  python -m fastlocal.report runs/table4
  python -m fastlocal.report runs/ --tables 1,5 --format csv --out results.csv
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastlocal.report",
        description="Compare the finished runs under DIR... with the paper's Tables 1, 2, 4, 5 and 6.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, or folders holding them")
    parser.add_argument("--format", choices=("md", "csv"), default="md", help="md (default) or csv")
    parser.add_argument("--out", metavar="FILE", help="write the report to FILE (default: print it)")
    parser.add_argument("--tables", help="only these tables, e.g. 4 or 1,5 (default: all)")
    args = parser.parse_args(argv)
    if args.tables:
        numbers = [t.strip() for t in args.tables.split(",") if t.strip()]
        if not all(n in ("1", "2", "4", "5", "6") for n in numbers):
            raise UserError(f"--tables {args.tables}: give table numbers among 1, 2, 4, 5, 6 (e.g. 4 or 1,5)")
        args.tables = [f"Table {n}" for n in numbers]
    return args


@exits_2_on_user_error
def main(argv: list[str] | None = None) -> int:
    from fastlocal.paper import build_report, to_csv, to_markdown

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    report = build_report(args.dirs, args.tables)
    text = to_csv(report) if args.format == "csv" else to_markdown(report)
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as err:
            raise UserError(f"--out {args.out}: cannot write it ({err.strerror}); choose another file") from None
        print(f"wrote {args.out}: {len(report['rows'])} paper rows, {len(report['other_runs'])} other runs")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
