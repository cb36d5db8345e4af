"""One small finished run with held-out pairs and --diagnostics, shared by the held-out, eval and report tests
(a plain module the tests import): made once per test session under pytest's base temp directory."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lowmem_sdpo.engine import RunConfig
from tests.support.engine_fixtures import run, small_config

EVAL_SPLIT = 0.25
EVAL_EVERY = 2
# The rows also go to TensorBoard where it is installed (the dev extra installs it), for tests/unit/trackers/test_trackers.py.
REPORT_TO = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"


def evaluated_run(tmp_path_factory: Any) -> tuple[RunConfig, list[dict[str, Any]]]:
    base = Path(tmp_path_factory.getbasetemp()) / "evaluated-run"
    config = small_config(
        base, diagnostics=True, eval_split=EVAL_SPLIT, eval_every=EVAL_EVERY, report_to=REPORT_TO
    )
    # resume=True over a finished run only reads the summaries back; a new one is trained once.
    finished = (Path(config.output_dir) / "step-2" / "summary.json").is_file()
    return config, run(config, resume=finished)
