"""Workers give large allocations their own mappings, so memory a stage frees leaves its resident set."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]

# Frees a 30 MiB block (glibc then raises its dynamic mmap threshold to 30 MiB), allocates 2 MiB and
# prints whether that block got its own mapping (mallinfo2's count of mmapped blocks went up).
_PROBE = textwrap.dedent("""
    import ctypes, sys
    sys.path.insert(0, sys.argv[1])
    from builder.engine.memory import return_large_frees_to_os
    if sys.argv[2] == "set":
        return_large_frees_to_os()
    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = Info
    libc.free(libc.malloc(30 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(2 << 20)
    print(libc.mallinfo2().hblks - before)
""")


def _own_mappings(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(PROJECT), mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_allocations_get_own_mappings() -> None:
    assert _own_mappings("set") == 1
    assert _own_mappings("default") == 0  # glibc's default serves it from the heap: the setting is what changes it
