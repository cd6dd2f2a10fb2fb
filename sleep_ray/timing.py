"""Wall seconds of named parts, added up in a dict (a consolidation's parts, D's sampling)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, MutableMapping


@contextlib.contextmanager
def timed(seconds: MutableMapping[str, float], part: str) -> Iterator[None]:
    """Add the block's wall time to `seconds[part]` (a missing part starts at 0), also when the
    block raises."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - t0
