"""A byte-bounded memo for merge methods' per-tensor quantities.

Some merge methods run faster from quantities that depend only on the sources: DARE's random field and TIES' sorted
task-vector magnitudes (``(K, n)`` per parameter tensor each), TIES' table of magnitude order statistics and SLERP's
interpolation coefficients (a few numbers per model). Kept for every tensor of a ViT-B the per-element ones add several model sizes to a merger's memory, so a
:class:`~medsamix.merging.merger.Merger` shares one :class:`MemoCache` between all its
:class:`~medsamix.merging.registry.Sources`, with a cap in bytes. When a value is absent (never computed, or over
the cap) the method computes exactly what the current merge needs: a memo changes how fast a merge runs, never its
result.

Policy: values of at most :data:`SMALL_BYTES` (per-tensor scalars such as SLERP's coefficients and TIES' tables) are
always kept and do not count against the cap (a ViT-B merger holds a few hundred of them: about a megabyte). Larger values are kept
first come, first kept, while the cap has room; a value replaces an older one under the same key, but never evicts
another key's: a merger visits its tensors in the same order on every merge, and a least-recently-used eviction would
then evict each value just before it is needed again (every access a miss, each paying for the memo's construction).

Keys are ``(parameter name, quantity name)`` tuples (the parameter names of one merger are unique); values are
tensors, numbers or tuples of them, counted by :func:`value_bytes`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from torch import Tensor

UNBOUNDED: None = None
"""``max_bytes`` of a cache that keeps everything (a standalone :class:`~medsamix.merging.registry.Sources`)."""


def value_bytes(value: Any) -> int:
    """Bytes a memoised value holds: tensor storage, 8 per Python number, summed over tuples and lists."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(value_bytes(v) for v in value)
    return 8


SMALL_BYTES = 4096
"""Values of at most this many bytes are always kept, outside the cap."""


class MemoCache:
    """Memoised values; those over :data:`SMALL_BYTES` take at most ``max_bytes`` in total (first come, first kept).

    Args:
        max_bytes: The cap in bytes for values over :data:`SMALL_BYTES` (0: keep none of them; ``None``: no cap).

    Attributes:
        nbytes: Bytes of the values under the cap now held.
        small_bytes: Bytes of the small values now held (not capped).
        hits, misses: Lookups that found / did not find a value.
    """

    def __init__(self, max_bytes: int | None = UNBOUNDED) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.small_bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: dict[Hashable, tuple[Any, int]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def admits(self, nbytes: int, key: Hashable | None = None) -> bool:
        """Whether a value of ``nbytes`` would be kept now (replacing the value under ``key``, if any)."""
        if nbytes <= SMALL_BYTES or self.max_bytes is None:
            return True
        item = self._items.get(key) if key is not None else None
        freed = item[1] if item is not None and item[1] > SMALL_BYTES else 0
        return self.nbytes - freed + nbytes <= self.max_bytes

    def get(self, key: Hashable) -> Any | None:
        """The value stored under ``key``, or ``None``."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        return item[0]

    def put(self, key: Hashable, value: Any) -> bool:
        """Store ``value`` under ``key`` (replacing its previous value) if :meth:`admits` it.

        Returns:
            Whether the value was stored (if not, the previous value under ``key`` is dropped all the same).
        """
        size = value_bytes(value)
        fits = self.admits(size, key)
        self.discard(key)
        if not fits:
            return False
        self._items[key] = (value, size)
        if size <= SMALL_BYTES:
            self.small_bytes += size
        else:
            self.nbytes += size
        return True

    def discard(self, key: Hashable) -> None:
        """Drop ``key`` if present."""
        item = self._items.pop(key, None)
        if item is not None:
            if item[1] <= SMALL_BYTES:
                self.small_bytes -= item[1]
            else:
                self.nbytes -= item[1]

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Change the cap; the values under the cap are dropped when they no longer fit it."""
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.max_bytes = max_bytes
        if max_bytes is not None and self.nbytes > max_bytes:
            for key in [k for k, (_, size) in self._items.items() if size > SMALL_BYTES]:
                self.discard(key)

    def clear(self) -> None:
        """Drop everything."""
        self._items.clear()
        self.nbytes = self.small_bytes = 0
