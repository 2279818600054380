"""Give freed heap memory back to the operating system during long passes.

glibc serves the per-batch temporaries of a pass (a few MB to ~30 MB each, below its dynamic mmap
threshold) from the heap; interleaved with small tensors that live on (per-batch results), the freed
space stays resident, and a statistics pass over 60,000 Fashion-MNIST images grew the process by
several GB that way. ``trim_heap`` (glibc's ``malloc_trim``) returns those pages; elsewhere it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

TRIM_EVERY = 8  # batches between trims in a pass (and one at its end): a trim takes milliseconds, a batch hundreds


@lru_cache(maxsize=1)
def _malloc_trim():  # noqa: ANN202 -- a ctypes function, or None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> None:
    """Return the heap's free pages to the operating system (glibc); a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
