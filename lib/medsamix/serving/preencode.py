"""Background pre-encoding: embed an opened volume's slices before the user prompts them.

A :class:`PreEncoder` owns one daemon thread. :meth:`PreEncoder.schedule` (called on the first prompt on a volume,
or when a client opens an image) gives it a job: the volume's slices ``k`` ordered by distance ``|k - center|`` to
the prompted (or middle) slice, nearest first, at most ``max_slices`` of them and never more than the shared
:class:`~medsamix.serving.segmenter.EmbeddingCache` holds (so pre-encoding never evicts its own nearest slices).
A newer job replaces the previous one (the user moved on to another volume).

Priority: interactive requests run inside :meth:`PreEncoder.interactive`; while one is active the thread starts no
new batch, and a request waits at most for the batch in progress (one :attr:`Segmenter.encode_batch` of slices).

Invalidation: embeddings are cached under the segmenter's model version; when a new published version is served,
:meth:`Segmenter.set_model` drops the old version's embeddings and the running job goes on with the new version
(each step encodes whatever of the job's slices is not cached for the version served now).

Configuration: ``enabled`` / ``max_slices`` arguments, or :meth:`PreEncoder.from_env` with ``MEDSAMIX_PREENCODE``
("0", "false", "off" or "no" switch it off) and ``MEDSAMIX_PREENCODE_SLICES`` (slice budget per volume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Iterator

import numpy as np

from medsamix.errors import ConfigError, check_flag
from medsamix.serving.segmenter import Segmenter

log = logging.getLogger(__name__)

DEFAULT_MAX_SLICES = 256
ENV_SWITCH = "MEDSAMIX_PREENCODE"
ENV_SLICES = "MEDSAMIX_PREENCODE_SLICES"


def slice_order(n_slices: int, center: int) -> list[int]:
    """Slice indices ``0..n_slices-1`` by distance to ``center`` (ties: the higher slice first)."""
    center = min(max(int(center), 0), n_slices - 1)
    return sorted(range(n_slices), key=lambda k: (abs(k - center), -k))


@dataclasses.dataclass
class _Job:
    segmenter: Segmenter
    image_key: str
    volume: np.ndarray
    order: list[int]
    encoded: int = 0


class PreEncoder:
    """Encodes the slices of the volume opened last in a background thread (see the module docstring).

    Args:
        enabled: False: :meth:`schedule` does nothing.
        max_slices: Most slices pre-encoded per volume (the slice budget).
    """

    def __init__(self, enabled: bool = True, max_slices: int = DEFAULT_MAX_SLICES) -> None:
        if max_slices < 0:
            raise ConfigError(f"pre-encoding slice budget must be >= 0, got {max_slices}")
        self.enabled = enabled and max_slices > 0
        self.max_slices = max_slices
        self._cond = threading.Condition()
        self._job: _Job | None = None
        self._active = 0  # interactive requests running
        self._busy = False  # a batch is being encoded
        self._thread: threading.Thread | None = None
        self._stopped = False

    @classmethod
    def from_env(cls, enabled: bool = True, max_slices: int | None = None) -> PreEncoder:
        """A pre-encoder configured by the arguments, overridden by ``MEDSAMIX_PREENCODE(_SLICES)``."""
        if not check_flag(os.environ.get(ENV_SWITCH), ENV_SWITCH, ConfigError, default=True):  # it can only turn off
            enabled = False
        raw = os.environ.get(ENV_SLICES, "").strip()
        if raw:
            try:
                max_slices = int(raw)
            except ValueError:
                raise ConfigError(f"{ENV_SLICES}: expected a whole number of slices, got {raw!r}") from None
        return cls(enabled, DEFAULT_MAX_SLICES if max_slices is None else max_slices)

    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        """Run an interactive request: no new pre-encoding batch starts until it ends."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def schedule(self, segmenter: Segmenter, image_key: str, volume: np.ndarray, center: int | None = None) -> bool:
        """Pre-encode ``volume`` ``(I, J, K)`` for ``segmenter``'s model, nearest slices to ``center`` first.

        Returns:
            True when a job was queued (False: switched off, or the same volume is already queued for this
            segmenter).
        """
        if not self.enabled:
            return False
        n = int(volume.shape[2])
        order = slice_order(n, n // 2 if center is None else center)[:self.max_slices]
        with self._cond:
            job = self._job
            if job is not None and job.segmenter is segmenter and job.image_key == image_key:
                return False
            self._job = _Job(segmenter, image_key, volume, order)
            if self._thread is None or not self._thread.is_alive():
                self._stopped = False
                self._thread = threading.Thread(target=self._run, name="medsamix-preencode", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    def pending(self) -> int:
        """Slices of the current job not yet cached for the version served now (0 when idle)."""
        with self._cond:
            job = self._job
        return 0 if job is None else len(self._todo(job))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current job is done (True) or ``timeout`` seconds passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._job is None and not self._busy, timeout)

    def stop(self) -> None:
        """Stop the thread after the batch in progress."""
        with self._cond:
            self._stopped = True
            self._job = None
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    @staticmethod
    def _todo(job: _Job) -> list[int]:
        seg = job.segmenter
        cap = len(job.order)
        emb = seg.cache.keys()
        if emb:  # never queue more than the cache holds besides the slice being prompted
            one = seg.cache.nbytes / max(1, len(emb))
            cap = min(cap, max(0, int(seg.cache.max_bytes // max(one, 1.0)) - 1))
        return [k for k in job.order[:cap] if (job.image_key, k, seg.version) not in seg.cache]

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or (self._job is not None and self._active == 0))
                if self._stopped:
                    return
                job = self._job
                assert job is not None
                todo = self._todo(job)
                if not todo or job.encoded >= 2 * len(job.order):  # done (or the cache keeps dropping them)
                    self._job = None
                    self._cond.notify_all()
                    continue
                self._busy = True
            try:
                job.encoded += len(job.segmenter.encode_slices(job.image_key, job.volume,
                                                               todo[:job.segmenter.encode_batch], preencoded=True))
            except Exception:  # noqa: BLE001 - a background failure must not end serving; the prompt path encodes
                log.exception("pre-encoding %s failed; dropping the job", job.image_key)
                with self._cond:
                    if self._job is job:
                        self._job = None
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


__all__ = ["DEFAULT_MAX_SLICES", "ENV_SLICES", "ENV_SWITCH", "PreEncoder", "slice_order"]
