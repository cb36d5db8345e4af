"""Writes a run's report: the plots (plots.py), report.md embedding them beside the tables (tables.py), and
report.html with the same content. The directory is written whole and then renamed into place."""

from __future__ import annotations

import html
from pathlib import Path

from lowmem_sdpo.atomic import atomic_dir
from lowmem_sdpo.checks import check_replaceable_dir, write_marker
from lowmem_sdpo.report.plots import Plot, draw_plots
from lowmem_sdpo.report.rundata import RunData, read_run
from lowmem_sdpo.report.tables import Table, settings_table, summary_table

REPORT_DIR = "report"
REPORT_KIND = "report"  # the marker kind: only a directory holding it is replaced by a new report
MARKDOWN = "report.md"
HTML = "report.html"


def _md_table(table: Table) -> str:
    header, rows = table
    def cells(row: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"  # a | in a value is not a column

    lines = [cells(header), "|" + "---|" * len(header)]
    lines += [cells(row) for row in rows]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown(data: RunData, plots: list[tuple[Plot, Path]]) -> str:
    parts = [
        f"# sDPO run report: {data.run_dir.name}",
        "",
        "## Settings",
        "",
        _md_table(settings_table(data.run)),
        "",
        "## Summary per step",
        "",
        _md_table(summary_table(data.summaries)),
        "",
    ]
    for plot, path in plots:
        parts += [f"## {plot.title}", "", f"![{plot.title}]({path.name})", ""]
    return "\n".join(parts)


def html_page(data: RunData, plots: list[tuple[Plot, Path]]) -> str:
    title = html.escape(f"sDPO run report: {data.run_dir.name}")
    figures = "".join(
        f"<h2>{html.escape(p.title)}</h2><img src='{html.escape(path.name)}' alt='{html.escape(p.title)}'>"
        for p, path in plots
    )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>"
        f"<body><h1>{title}</h1><h2>Settings</h2>{_html_table(settings_table(data.run))}"
        f"<h2>Summary per step</h2>{_html_table(summary_table(data.summaries))}{figures}</body></html>\n"
    )


def build_report(run_dir: Path, out: Path | None = None) -> Path:
    """Writes the report of `run_dir` into `out` (default RUN/report; new, empty or an earlier report, which is
    replaced; anything else is refused); returns report.md's path."""
    out = Path(out) if out is not None else Path(run_dir) / REPORT_DIR
    check_replaceable_dir("--out", out, REPORT_KIND, keep=(Path(run_dir),))
    data = read_run(Path(run_dir))
    with atomic_dir(out) as tmp:
        write_marker(tmp, REPORT_KIND)
        plots = draw_plots(data, tmp)
        (tmp / MARKDOWN).write_text(markdown(data, plots), encoding="utf-8")
        (tmp / HTML).write_text(html_page(data, plots), encoding="utf-8")
    return out / MARKDOWN
