"""runtime/cpu_allocator.py: what `--cpu-allocator` decides for a process, from the allocator it runs on, the
libraries the system has (a finder standing in for ctypes.util.find_library) and the restart marker."""

from __future__ import annotations

import pytest

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.runtime.cpu_allocator import (
    STARTED_FOR,
    AllocatorPlan,
    find_allocator,
    plan_allocator,
    preload_environment,
)

TCMALLOC = "libtcmalloc_minimal.so.4"


def finder(*installed: str):
    """find_library over a system holding `installed` (names as find_library takes them)."""
    sonames = {"tcmalloc_minimal": TCMALLOC, "tcmalloc": "libtcmalloc.so.4", "jemalloc": "libjemalloc.so.2"}
    return lambda name: sonames[name] if name in installed else None


def test_auto_restarts_a_glibc_process_on_tcmalloc_where_it_is_installed():
    plan = plan_allocator("auto", active="glibc", environ={}, find=finder("tcmalloc_minimal", "jemalloc"))
    assert plan == AllocatorPlan("tcmalloc", TCMALLOC)
    # The full build serves when the minimal one is absent; jemalloc alone is not taken by auto.
    assert plan_allocator("auto", active="glibc", environ={}, find=finder("tcmalloc")).preload == "libtcmalloc.so.4"
    assert plan_allocator("auto", active="glibc", environ={}, find=finder("jemalloc")) == AllocatorPlan("glibc", None)


def test_auto_never_restarts_twice_nor_over_a_users_preload():
    installed = finder("tcmalloc_minimal")
    # The restarted process: the preload did not take (it still runs on glibc), so it goes on as it is.
    assert plan_allocator("auto", active="glibc", environ={STARTED_FOR: "tcmalloc"}, find=installed).preload is None
    assert plan_allocator("auto", active="jemalloc", environ={}, find=installed) == AllocatorPlan("jemalloc", None)
    assert plan_allocator("auto", active="tcmalloc", environ={}, find=installed) == AllocatorPlan("tcmalloc", None)


def test_glibc_keeps_the_process_as_it_is():
    assert plan_allocator("glibc", active="glibc", environ={}, find=finder("tcmalloc_minimal")).preload is None
    assert plan_allocator("glibc", active="tcmalloc", environ={}, find=finder()) == AllocatorPlan("tcmalloc", None)


def test_a_named_allocator_restarts_once_or_is_refused_in_one_line():
    assert plan_allocator("jemalloc", active="glibc", environ={}, find=finder("jemalloc")) == AllocatorPlan(
        "jemalloc", "libjemalloc.so.2"
    )
    assert plan_allocator("tcmalloc", active="tcmalloc", environ={STARTED_FOR: "tcmalloc"}, find=finder()).preload is None
    with pytest.raises(InputError, match=r"--cpu-allocator tcmalloc: no libtcmalloc_minimal or libtcmalloc .*apt install"):
        plan_allocator("tcmalloc", active="glibc", environ={}, find=finder("jemalloc"))
    with pytest.raises(InputError, match="restarted with it in LD_PRELOAD but runs on glibc"):
        plan_allocator("tcmalloc", active="glibc", environ={STARTED_FOR: "tcmalloc"}, find=finder("tcmalloc_minimal"))
    with pytest.raises(InputError, match="expected one of auto, glibc, tcmalloc, jemalloc, got 'mimalloc'"):
        plan_allocator("mimalloc", active="glibc", environ={}, find=finder())


def test_the_preload_goes_first_and_keeps_what_was_there():
    plan = AllocatorPlan("tcmalloc", TCMALLOC)
    env = preload_environment(plan, {"LD_PRELOAD": "/opt/libfoo.so", "PATH": "/bin"})
    quiet = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**62)}  # no line per allocation over 1 GiB
    assert env == {"LD_PRELOAD": f"{TCMALLOC} /opt/libfoo.so", "PATH": "/bin", STARTED_FOR: "tcmalloc", **quiet}
    assert preload_environment(plan, {})["LD_PRELOAD"] == TCMALLOC
    mine = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "1000"}
    assert preload_environment(plan, mine)["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "1000"  # the user's stays
    assert "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" not in preload_environment(AllocatorPlan("jemalloc", "j.so"), {})
    with pytest.raises(ValueError):
        preload_environment(AllocatorPlan("glibc", None), {})


def test_find_allocator_prefers_the_minimal_build():
    assert find_allocator("tcmalloc", finder("tcmalloc", "tcmalloc_minimal")) == TCMALLOC
    assert find_allocator("jemalloc", finder()) is None
