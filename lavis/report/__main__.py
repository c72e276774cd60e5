"""CLI: ``python -m lavis.report RUN_DIR [--out report.html] [--compare OTHER_RUN_DIR]``."""

from __future__ import annotations

import argparse
import sys

from lavis.common.errors import UserError


def main(argv: list[str] | None = None) -> int:
    """Write the HTML report of a run directory and print its path."""
    parser = argparse.ArgumentParser(prog="python -m lavis.report", description=main.__doc__)
    parser.add_argument("run_dir", help="a run directory (output_dir/run_name) of train.py or evaluate.py")
    parser.add_argument("--out", default=None, help="where to write the HTML (default: RUN_DIR/report.html)")
    parser.add_argument(
        "--compare",
        default=None,
        metavar="OTHER_RUN_DIR",
        help="another run shown beside this one, on the same samples",
    )
    args = parser.parse_args(argv)
    from lavis.report import build_report

    try:
        path = build_report(args.run_dir, out=args.out, compare=args.compare)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
