"""`lowmem-sdpo report`: plots and a report.md / report.html of a run directory (report/build.py)."""

from lowmem_sdpo.report.build import build_report

__all__ = ["build_report"]
