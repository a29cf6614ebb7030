"""Log lines about many objects: a few by name and the rest as a count.

One Prometheus going away concerns every model that reads it; at 10,000 models a line per
model is a flood that hides everything else, so such events are one line each.
"""

from __future__ import annotations

from collections.abc import Sequence

NAMED = 5


def some(items: Sequence[object]) -> str:
    """`count=N names='a, b, …'`, plus `and_more=M` past the first NAMED."""
    text = f"count={len(items)} names={', '.join(str(i) for i in items[:NAMED])!r}"
    return text + (f" and_more={len(items) - NAMED}" if len(items) > NAMED else "")
