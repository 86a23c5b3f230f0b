"""Background pre-encoding (medsamix.serving.preencode) with the tiny architecture: order, priority, cache bound,
invalidation on a new model version, the off switch, and prompts on pre-encoded slices without encoder passes."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import torch

from medsamix.data.volumes import VolumeCache
from medsamix.errors import ConfigError
from medsamix.models.encoding import batch_size_for, encode_batches
from medsamix.serving.preencode import PreEncoder, slice_order
from medsamix.serving.prompts import parse_prompt
from medsamix.serving.segmenter import EmbeddingCache, Segmenter
from medsamix.serving.service import InteractiveService, ServedModel


@pytest.fixture(scope="module")
def parts(tiny_segmenter_parts):
    return tiny_segmenter_parts


class _RecordingCache(EmbeddingCache):
    """Records the slice index of every embedding stored, in order."""

    def __init__(self, max_bytes: int = 2**30) -> None:
        super().__init__(max_bytes)
        self.slices: list[int] = []

    def put(self, key, value, preencoded=False):
        self.slices.append(key[1])
        super().put(key, value, preencoded)


class _Counted:
    """Counts image-encoder forward calls; ``slices``: the slices stored in the segmenter's recording cache."""

    def __init__(self, seg: Segmenter) -> None:
        self.calls = 0
        self.cache = seg.cache
        self.hook = seg.model.image_encoder.register_forward_hook(self._hook)

    @property
    def slices(self) -> list[int]:
        return self.cache.slices

    def _hook(self, *a):
        self.calls += 1

    def close(self) -> None:
        self.hook.remove()


def _volume(k: int = 9) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (40, 48, k)).astype(np.float32)


def test_slice_order_is_nearest_first():
    assert slice_order(7, 3) == [3, 4, 2, 5, 1, 6, 0]
    assert slice_order(4, 0) == [0, 1, 2, 3]
    assert slice_order(4, 99) == [3, 2, 1, 0]


def test_preencodes_nearest_first_and_a_prompt_there_needs_no_encoder(parts):
    model, prep = parts
    seg = Segmenter(model, prep, "v1", _RecordingCache(), encode_batch=1)
    count = _Counted(seg)
    pre = PreEncoder(max_slices=5)
    vol = _volume()
    try:
        assert pre.schedule(seg, "img", vol, center=6)
        assert pre.wait(30)
        assert count.slices == [6, 7, 5, 8, 4] and count.calls == 5
        assert all(seg.cache.is_preencoded(("img", k, "v1")) for k in (4, 5, 6, 7, 8))
        r = seg.segment("img", vol, parse_prompt({"roi": [5, 30, 5, 40, 4, 4]}, vol.shape))
        assert count.calls == 5 and r.latency.cache_misses == 0 and r.latency.preencoded_hits == 1
        r = seg.segment("img", vol, parse_prompt({"roi": [5, 30, 5, 40, 3, 3]}, vol.shape))  # beyond the budget
        assert count.calls == 6 and r.latency.cache_misses == 1
        # 3D propagation over pre-encoded slices reuses them
        r = seg.segment("img", vol, parse_prompt({"roi": [5, 30, 5, 40, 5, 7]}, vol.shape))
        assert count.calls == 6 and r.latency.cache_misses == 0
    finally:
        count.close()
        pre.stop()


def test_interactive_requests_pause_preencoding(parts):
    model, prep = parts
    seg = Segmenter(model, prep, "v1", _RecordingCache(), encode_batch=1)
    count = _Counted(seg)
    pre = PreEncoder()
    vol = _volume()
    try:
        with pre.interactive():
            pre.schedule(seg, "img", vol, center=0)
            time.sleep(0.5)
            assert count.calls == 0 and pre.pending() == 9
        assert pre.wait(30) and count.calls == 9 and pre.pending() == 0
    finally:
        count.close()
        pre.stop()


def test_preencoding_stays_within_the_cache_bound(parts):
    model, prep = parts
    one = 4 * model.prompt_encoder.embed_dim * int(np.prod(model.prompt_encoder.image_embedding_size))
    seg = Segmenter(model, prep, "v1", cache=_RecordingCache(max_bytes=4 * one), encode_batch=1)
    count = _Counted(seg)
    pre = PreEncoder()
    vol = _volume()
    try:
        pre.schedule(seg, "img", vol, center=4)
        assert pre.wait(30)
        # three slices (the cache holds four: one is left for the slice being prompted), nearest first, none evicted
        assert count.slices == [4, 5, 3] and seg.cache.nbytes <= 4 * one
        assert sorted(k[1] for k in seg.cache.keys()) == [3, 4, 5]
    finally:
        count.close()
        pre.stop()


def test_new_model_version_invalidates_and_reencodes(parts):
    model, prep = parts
    seg = Segmenter(model, prep, "v1", encode_batch=2)
    pre = PreEncoder(max_slices=4)
    vol = _volume()
    try:
        pre.schedule(seg, "img", vol)
        assert pre.wait(30) and len(seg.cache) == 4
        seg.set_model(model, prep, "v2")  # a new published version is served
        assert len(seg.cache) == 0
        assert pre.schedule(seg, "img", vol)  # the finished job is gone: a new one is queued
        assert pre.wait(30)
        assert sorted(k[1] for k in seg.cache.keys()) == [3, 4, 5, 6] and {k[2] for k in seg.cache.keys()} == {"v2"}
    finally:
        pre.stop()


def test_off_switch(parts, monkeypatch):
    model, prep = parts
    seg = Segmenter(model, prep, "v1")
    monkeypatch.setenv("MEDSAMIX_PREENCODE", "0")
    pre = PreEncoder.from_env()
    assert not pre.enabled and not pre.schedule(seg, "img", _volume()) and len(seg.cache) == 0
    monkeypatch.setenv("MEDSAMIX_PREENCODE", "1")
    monkeypatch.setenv("MEDSAMIX_PREENCODE_SLICES", "3")
    pre = PreEncoder.from_env()
    assert pre.enabled and pre.max_slices == 3
    monkeypatch.setenv("MEDSAMIX_PREENCODE_SLICES", "many")
    with pytest.raises(ConfigError, match="MEDSAMIX_PREENCODE_SLICES"):
        PreEncoder.from_env()
    assert not PreEncoder(max_slices=0).enabled


def test_batched_encoding_equals_one_by_one(parts):
    model, prep = parts
    x = prep.images(np.moveaxis(_volume(5), 2, 0))
    one = encode_batches(model.image_encoder, x, 1, "cpu")
    many = encode_batches(model.image_encoder, x, 5, "cpu")
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-5)
    assert batch_size_for(model.image_encoder, "cpu") == 1
    assert batch_size_for(model.image_encoder, "cuda", memory_bytes=1) == 1


def test_service_reports_precomputed_embeddings(parts, tmp_path):
    model, prep = parts
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(_volume(), np.eye(4)), str(path))
    pre = PreEncoder()
    svc = InteractiveService("m", lambda: ServedModel("m", model, prep, "v1", "test"), VolumeCache(),
                             EmbeddingCache(), preencoder=pre)
    try:
        first = svc.run(path, {"roi": [5, 30, 5, 40, 4, 4]})
        assert first.params["embedding_precomputed"] is False
        assert pre.wait(30)
        other = svc.run(path, {"roi": [5, 30, 5, 40, 8, 8]})  # a slice never prompted before
        assert other.params["embedding_precomputed"] is True
        assert other.params["latencies"]["preencoded_hits"] == 1
    finally:
        pre.stop()
