"""`lowmem-sdpo data inspect` (what each step holds after loading and tokenizing) and `data aliases`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lowmem_sdpo.checks import check_number
from lowmem_sdpo.data.aliases import DATASET_ALIASES
from lowmem_sdpo.data.spec import __doc__ as STEPS_GRAMMAR
from lowmem_sdpo.data.spec import parse_steps
from lowmem_sdpo.data.types import StepData, TokenizedStep


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="inspect preference data and dataset aliases")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(handler=lambda _args: _print_help(data))

    inspect = data_sub.add_parser(
        "inspect",
        help="load, normalise and tokenize each step; print what training would see",
        description=STEPS_GRAMMAR,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument(
        "--model", required=True, help="model whose tokenizer to use (hub id, dir, or 'tiny')"
    )
    inspect.add_argument(
        "--steps", required=True, help="comma-separated step items, e.g. openorca,ultrafeedback"
    )
    inspect.add_argument("--columns", help="map your column names: prompt=question,chosen=good,rejected=bad")
    inspect.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (default 1024)")
    inspect.add_argument(
        "--max-prompt-length", type=int, default=None,
        help="prompt tokens (default 512, at most half of --max-length: as `run`)",
    )  # fmt: skip
    inspect.add_argument("--seed", type=int, default=0, help="seed for @K splits (default 0)")
    inspect.add_argument(
        "--desirable-threshold", type=float, default=3, help="HelpSteer: helpfulness >= this is desirable"
    )
    inspect.add_argument(
        "--tokens",
        type=int,
        default=0,
        metavar="N",
        help="also show the first N kept examples of each step as token ids and pieces (default 0)",
    )
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.set_defaults(handler=run_inspect)

    aliases = data_sub.add_parser("aliases", help="list the dataset aliases --steps understands")
    aliases.add_argument("--json", action="store_true", help="print JSON instead of a table")
    aliases.set_defaults(handler=run_aliases)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _example(step: StepData, tokenized: TokenizedStep, tokenizer: Any) -> dict[str, Any] | None:
    """The first kept example, decoded with special tokens so BOS/EOS placement is visible."""

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    if tokenized.pairs:
        p = tokenized.pairs[0]
        return {"prompt": text(p.prompt_ids), "chosen": text(p.chosen_ids), "rejected": text(p.rejected_ids)}
    if tokenized.unpaired:
        e = tokenized.unpaired[0]
        return {"prompt": text(e.prompt_ids), "completion": text(e.completion_ids), "label": e.label}
    return None


def _tokens(tokenized: TokenizedStep, tokenizer: Any, n: int) -> list[dict[str, Any]]:
    """The first n kept examples exactly as training sees them: ids, and the tokenizer's piece for each."""

    def part(name: str, ids: list[int]) -> dict[str, Any]:
        return {f"{name}_ids": ids, f"{name}_pieces": tokenizer.convert_ids_to_tokens(ids)}

    if tokenized.pairs:
        return [
            {
                **part("prompt", p.prompt_ids),
                **part("chosen", p.chosen_ids),
                **part("rejected", p.rejected_ids),
            }
            for p in tokenized.pairs[:n]
        ]
    return [
        {**part("prompt", e.prompt_ids), **part("completion", e.completion_ids), "label": e.label}
        for e in tokenized.unpaired[:n]
    ]


def _report(step: StepData, tokenized: TokenizedStep, tokenizer: Any, n_tokens: int) -> dict[str, Any]:
    return {
        "label": step.label,
        "source": step.source,
        "schema": step.schema,
        "kind": "unpaired" if step.unpaired else "pairs",
        "fingerprint": step.fingerprint(),
        **tokenized.stats,
        "example": _example(step, tokenized, tokenizer),
        "tokens": _tokens(tokenized, tokenizer, n_tokens),
    }


def run_inspect(args: argparse.Namespace) -> int:
    # Every flag before the data or the tokenizer is read (tokenize_step checks the lengths again, for callers).
    check_number("--tokens", args.tokens, low=0, integer=True)
    check_number("--max-length", args.max_length, low=2, integer=True, note=" (prompt token + answer token)")
    if args.max_prompt_length is None:
        from lowmem_sdpo.engine.config import default_prompt_length

        args.max_prompt_length = default_prompt_length(args.max_length)
    check_number("--max-prompt-length", args.max_prompt_length, low=1, integer=True)
    check_number("--desirable-threshold", args.desirable_threshold)
    parse_steps(args.steps)

    from lowmem_sdpo.data import load_steps, load_tokenizer, parse_columns, tokenize_step
    from lowmem_sdpo.models.resolve import tokenizer_location

    steps = load_steps(
        args.steps,
        columns=parse_columns(args.columns),
        seed=args.seed,
        desirable_threshold=args.desirable_threshold,
    )
    tokenizer = load_tokenizer(tokenizer_location(args.model))
    reports, settings = [], {}
    for step in steps:
        tokenized = tokenize_step(
            step, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length
        )
        settings = tokenized.settings
        reports.append(_report(step, tokenized, tokenizer, args.tokens))
    if args.json:
        json.dump({"model": args.model, "settings": settings, "steps": reports}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_tables(args.model, settings, reports)
    return 0


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _lengths(summary: dict[str, int]) -> str:
    return f"{summary['p50']} / {summary['p95']} / {summary['max']}"


def _print_tables(model: str, settings: dict[str, Any], reports: list[dict[str, Any]]) -> None:
    """One key/value table per step (fits a narrow terminal however many steps), then its example."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = Console()
    console.print(
        Text(
            f"{len(reports)} step(s); tokenizer of {model}; max_length {settings.get('max_length')}, "
            f"max_prompt_length {settings.get('max_prompt_length')}; chat template: "
            f"{settings.get('chat_template')}; answers end with {settings.get('answer_end')}",
            style="bold",
        )
    )
    for i, r in enumerate(reports, start=1):
        table = Table(title=Text(f"step {i}: {r['label']}"), show_header=False, title_justify="left")
        table.add_column("field", style="bold", no_wrap=True)
        table.add_column("value", overflow="fold")
        fields = {
            "source": r["source"],
            "schema": f"{r['schema']} ({r['kind']})",
            "rows": str(r["rows"]),
            "kept": str(r["kept"]),
            "dropped": _counts(r["dropped"]),
            "truncated": _counts(r["truncated"]),
            "prompt tokens p50/p95/max": _lengths(r["prompt_tokens"]),
            "answer tokens p50/p95/max": _lengths(r["answer_tokens"]),
            "longest sequence": str(r["longest_sequence"]),
            "boundary merges": str(r["boundary_merges"]),
            "template mismatches": str(r["template_mismatches"]),
            "fingerprint": r["fingerprint"][:16],
        }
        for name, value in fields.items():
            table.add_row(name, Text(value))
        console.print(table)
        example = r["example"]
        if example is None:
            console.print("  no example kept")
            continue
        if r["tokens"]:
            console.print(_token_table(r["tokens"]))
        answers = (
            [("chosen", example["chosen"], "green"), ("rejected", example["rejected"], "red")]
            if "chosen" in example
            else [("desirable" if example["label"] else "undesirable", example["completion"], "cyan")]
        )
        for name, answer, colour in answers:
            body = Text(example["prompt"], style="dim")
            body.append("▌", style="bold yellow")
            body.append(answer, style=colour)
            console.print(Panel(body, title=f"example, {name} ('▌' = end of prompt)", title_align="left"))


def _escaped(piece: str) -> str:
    """A piece with its control characters spelled out, so a newline token shows as \\n."""
    return piece.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _pieces_text(pieces: list[str]) -> Any:
    """Pieces separated by spaces, in alternating colours so a piece that holds a space stays one piece."""
    from rich.text import Text

    text = Text()
    for i, piece in enumerate(pieces):
        text.append(" " if i else "")
        text.append(_escaped(piece), style="cyan" if i % 2 == 0 else "magenta")
    return text


def _token_table(examples: list[dict[str, Any]]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="first examples as tokens (pieces in alternating colours)", title_justify="left")
    for header in ("#", "part", "n", "pieces", "ids"):
        table.add_column(header, overflow="fold", no_wrap=header in ("#", "part", "n"))
    for i, example in enumerate(examples, start=1):
        parts = [name for name in ("prompt", "chosen", "rejected", "completion") if f"{name}_ids" in example]
        for name in parts:
            ids = example[f"{name}_ids"]
            pieces = _pieces_text(example[f"{name}_pieces"])
            table.add_row(str(i), name, str(len(ids)), pieces, Text(" ".join(map(str, ids))))
    return table


def run_aliases(args: argparse.Namespace) -> int:
    aliases = list(DATASET_ALIASES.values())
    if args.json:
        rows = [
            {"name": a.name, "hub_id": a.hub_id, "split": a.split, "kind": a.kind, "note": a.note}
            for a in aliases
        ]
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dataset aliases for --steps (NAME[:SPLIT][@K[:by=COLUMN]])")
    table.add_column("alias", no_wrap=True)
    for header in ("hub dataset", "default split", "kind", "note"):
        table.add_column(header, overflow="fold")
    for a in aliases:
        table.add_row(a.name, a.hub_id, a.split, a.kind, a.note)
    Console().print(table)
    return 0
