"""`lowmem-sdpo losses [--json]`, through an argparse tree built here (as the CLI registry builds it)."""

import argparse
import json

from lowmem_sdpo.cli import losses_cmd
from lowmem_sdpo.losses import LOSSES


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lowmem-sdpo")
    losses_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_table_lists_every_loss_and_its_flags(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps cells to the terminal width; keep each on one line
    assert run(["losses"]) == 0
    out = capsys.readouterr().out
    for name in LOSSES:
        assert name in out, name
    for text in ("--dpop-lambda", "--aot-temperature", "hinge2", "unpaired", "batch-coupled", "Melnyk"):
        assert text in out, text


def test_json_parses_and_describes_every_loss(capsys):
    assert run(["losses", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(LOSSES)
    by_name = {r["name"]: r for r in rows}
    assert by_name["sigmoid"]["data"] == "paired" and by_name["kto"]["data"] == "unpaired"
    assert by_name["dpop"]["options"]["dpop_lambda"] == {
        "flag": "--dpop-lambda",
        "default": 50.0,
        "type": "float",
        "choices": None,
        "help": LOSSES["dpop"].options["dpop_lambda"].help,
    }
    assert by_name["aot"]["options"]["aot_cost"]["choices"] == ["logistic", "hinge2", "lsq"]
    assert by_name["kto"]["options"]["policy_kl"]["flag"] is None  # an engine input, not a flag
    assert by_name["ipo"]["needs_tokens"] and by_name["aot_unpaired"]["batch_coupled"]
    assert all(r["formula"] and r["paper"] for r in rows)
