"""host_record: what run.json and benchmark JSONs say about the machine (lowmem_sdpo/host.py)."""

from __future__ import annotations

from lowmem_sdpo.host import NUMERIC_CPU_FLAGS, cpu_features

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Example
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile
processor\t: 1
model name\t: Intel(R) Xeon(R) Example
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile
"""


def test_cpu_features_read_model_and_flags_from_cpuinfo():
    got = cpu_features(CPUINFO)
    assert got["cpu_model"] == "Intel(R) Xeon(R) Example"
    want_present = {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert got["cpu_flags"] == {flag: flag in want_present for flag in NUMERIC_CPU_FLAGS}


def test_cpu_features_unknown_without_cpuinfo():
    assert set(cpu_features("")["cpu_flags"].values()) == {None}

