"""Everything in tests/e2e is an end-to-end run (whole CLI commands, several processes, kill-and-resume): marked
`slow`, so `-m 'not slow'` leaves the unit tests. CI (.ci/run) runs them all."""

from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A conftest hook sees every collected item, not only this folder's, so filter by path.
    for item in items:
        if E2E in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slow)
