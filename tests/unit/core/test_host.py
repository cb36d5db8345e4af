"""host_record: what run.json and benchmark JSONs say about the machine (lowmem_sdpo/host.py)."""

from __future__ import annotations

import platform

from lowmem_sdpo.host import NUMERIC_CPU_FLAGS, cpu_allocator, cpu_features, host_record

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



MAPS_GLIBC = """55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 131 /usr/bin/python3.11
7f1c2a000000-7f1c2a022000 r--p 00000000 08:01 2041 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2b000000-7f1c2b001000 rw-p 00000000 00:00 0
7ffd1e7f0000-7ffd1e811000 rw-p 00000000 00:00 0                          [stack]
"""
MAPS_TCMALLOC = MAPS_GLIBC + (
    "7f1c2c000000-7f1c2c010000 r-xp 00000000 08:01 3301 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n"
)
MAPS_JEMALLOC = MAPS_GLIBC + "7f1c2d000000-7f1c2d010000 r-xp 00000000 08:01 3302 /opt/lib/libjemalloc.so.2\n"


def test_cpu_allocator_names_a_preloaded_malloc_from_the_mapped_files():
    assert cpu_allocator(MAPS_TCMALLOC) == "tcmalloc"
    assert cpu_allocator(MAPS_JEMALLOC) == "jemalloc"
    # Without one, the C library's own: glibc on glibc builds of Python (what this host runs), else "system".
    libc = "glibc" if platform.libc_ver()[0] == "glibc" else "system"
    assert cpu_allocator(MAPS_GLIBC) == libc
    # A file that merely mentions the name in a directory is not the library.
    assert cpu_allocator(MAPS_GLIBC + "7f00-7f01 r--p 0 08:01 9 /data/libtcmalloc-notes/readme.txt\n") == libc


def test_host_record_says_which_malloc_this_process_runs_on():
    assert host_record()["cpu_allocator"] == cpu_allocator()


def test_git_commit_is_the_checkouts_head_unless_the_environment_names_one(monkeypatch):
    import subprocess
    from pathlib import Path

    from lowmem_sdpo.host import git_commit

    monkeypatch.delenv("LOWMEM_SDPO_COMMIT", raising=False)
    repo = Path(__file__).resolve().parents[3]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    assert git_commit() == (head.stdout.strip() if head.returncode == 0 else None)
    monkeypatch.setenv("LOWMEM_SDPO_COMMIT", "abc1234")  # what gpu_pass.sh hands a device copy without .git
    assert git_commit() == "abc1234"
