"""Experiment trackers for `run --report-to NAME`: metrics.jsonl's rows, sent as they are written."""

from lowmem_sdpo.trackers.registry import TRACKERS, RowFeed, check_tracker, open_tracker

__all__ = ["TRACKERS", "RowFeed", "check_tracker", "open_tracker"]
