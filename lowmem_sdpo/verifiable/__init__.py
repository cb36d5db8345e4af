"""Verifiable instructions (issue 27): prompts whose constraints code can check, and the judge that checks
them. Pure Python; the sDPO-against-DPO benchmark on a real model (benchmarks/bench_sdpo_real.py) and
`self-reward --judge python:lowmem_sdpo.verifiable.judge:score` use it."""
