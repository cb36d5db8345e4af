"""`lowmem-sdpo report RUN`: plots (the paper's Figure 2, training curves, held-out accuracy, throughput and
memory, reference drift) and report.md / report.html with the summary table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    report = subparsers.add_parser("report", help="plots and a report.md / report.html of a run", description=__doc__)
    report.add_argument("run", help="the run directory (holds run.json)")
    report.add_argument("--out", default=None, help="output directory (default RUN/report; replaced)")
    report.set_defaults(handler=report_command)


def report_command(args: argparse.Namespace) -> int:
    from lowmem_sdpo.report import build_report

    path = build_report(Path(args.run), Path(args.out) if args.out else None)
    print(f"report: {path}")
    return 0
