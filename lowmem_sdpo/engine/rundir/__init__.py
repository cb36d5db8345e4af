"""The run directory: its layout and run.json (`layout`), the keys that decide whether a cache or a resume
still fits (`keys`), and the per-step metrics and summary files (`metrics`)."""
