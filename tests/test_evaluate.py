"""Preprocessing conventions and the Dice evaluator with its embedding cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY
from medsamix.search.evaluate import Evaluator, dice_2d
from medsamix.models.preprocess import Preprocessor, intensity_range, to_255
from medsamix.data.slices import SliceSample, tight_box
from medsamix.data.tasks import Task
from medsamix.demo.training import target_lowres


def test_ct_window_and_mr_percentiles():
    assert intensity_range(np.zeros((4, 4, 4)), "CT") == (-160.0, 240.0)
    vol = np.concatenate([np.zeros(100), np.arange(1, 1001)]).astype(np.float32)
    lo, hi = intensity_range(vol, "MR")
    assert lo == pytest.approx(np.percentile(np.arange(1, 1001), 0.5))
    assert hi == pytest.approx(np.percentile(np.arange(1, 1001), 99.5))
    out = to_255(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), -160, 240)
    assert out.tolist() == pytest.approx([0, 0, 127.5, 255, 255])


def test_sam_style_resize_pad_normalise():
    prep = Preprocessor("sam", 256)
    img = np.full((100, 200), 123.675, dtype=np.float32)
    x = prep.images(img)
    assert x.shape == (1, 3, 256, 256)
    assert prep.resized_hw((100, 200)) == (128, 256)
    assert torch.allclose(x[0, 0, :128], torch.zeros(128, 256), atol=1e-4)  # (mean - mean) / std
    assert torch.equal(x[0, :, 128:], torch.zeros(3, 128, 256))  # padding below
    box = prep.boxes(np.array([[10, 20, 110, 60]]), (100, 200))
    assert torch.allclose(box, torch.tensor([[12.8, 25.6, 140.8, 76.8]]))  # scale 256 / 200 on both axes


def test_medsam_style_square_resize_unit_range():
    prep = Preprocessor("medsam", 256)
    img = np.linspace(0, 255, 100 * 200, dtype=np.float32).reshape(100, 200)
    x = prep.images(img)
    assert x.shape == (1, 3, 256, 256) and float(x.min()) >= 0 and float(x.max()) <= 1
    box = prep.boxes(np.array([[10, 20, 110, 60]]), (100, 200))
    assert torch.allclose(box, torch.tensor([[12.8, 51.2, 140.8, 153.6]]))  # x * 256/200, y * 256/100


@pytest.mark.parametrize("style", ["sam", "medsam"])
def test_mask_round_trip(style):
    """Ground truth mapped into the decoder's low-resolution frame and back lands on itself."""
    prep = Preprocessor(style, 256)
    mask = np.zeros((90, 150), dtype=bool)
    mask[20:60, 30:110] = True
    logits = (target_lowres(mask, prep, 64) - 0.5) * 20
    back = prep.masks(logits, mask.shape)[0, 0].numpy() > 0
    assert back.shape == mask.shape
    assert dice_2d(back, mask) > 0.95


def test_bad_style():
    with pytest.raises(ValueError, match="style"):
        Preprocessor("ct", 256)


def test_dice_2d_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert dice_2d(a, b) == pytest.approx(0.5)
    assert dice_2d(a, a) == pytest.approx(1.0)


def _samples() -> list[SliceSample]:
    rng = np.random.default_rng(0)
    out = []
    for study in ("p1", "p2"):
        for index in range(3):
            image = rng.uniform(0, 255, (48, 40)).astype(np.float32)
            for value, name in ((1, "liver"), (2, "spleen")):
                mask = np.zeros((48, 40), bool)
                mask[5 + value * 10: 15 + value * 10, 5 + index: 25] = True
                image[mask] = 200 + value * 20
                out.append(SliceSample(study, Task(name, value), 2, index, image, mask, tight_box(mask)))
    return out


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TINY.build()


def test_shared_slices_are_encoded_once_and_cached(model):
    ev = Evaluator(_samples(), batch_size=4)
    prep = Preprocessor("sam", TINY.img_size)
    assert ev.num_images == 6  # 12 samples on 6 slices
    r1 = ev.evaluate(model, prep, key="enc-A")
    assert ev.encoder_passes == 6
    r2 = ev.evaluate(model, prep, key="enc-A")
    assert ev.encoder_passes == 6  # decoder-only re-evaluation
    np.testing.assert_allclose(r1.per_sample, r2.per_sample)
    ev.evaluate(model, prep, key="enc-B")
    assert ev.encoder_passes == 12
    ev.evaluate(model, Preprocessor("medsam", TINY.img_size), key="enc-A")  # other preprocessing: new embeddings
    assert ev.encoder_passes == 18
    ev.evaluate(model, prep, key=None)
    ev.evaluate(model, prep, key=None)
    assert ev.encoder_passes == 30


def test_results_per_task_and_volume(model):
    samples = _samples()
    ev = Evaluator(samples)
    prep = Preprocessor("sam", TINY.img_size)
    res = ev.evaluate(model, prep)
    assert set(res.dice2d) == {"liver", "spleen"} and set(res.dice3d) == {"liver", "spleen"}
    preds = ev.predict(model, prep)
    liver = [i for i, s in enumerate(samples) if s.task.name == "liver"]
    assert res.dice2d["liver"] == pytest.approx(np.mean([dice_2d(preds[i], samples[i].mask) for i in liver]))
    per_volume = []
    for study in ("p1", "p2"):
        ids = [i for i in liver if samples[i].study_id == study]
        p = np.stack([preds[i] for i in ids])
        g = np.stack([samples[i].mask for i in ids])
        per_volume.append(2 * (p & g).sum() / (p.sum() + g.sum()))
    assert res.dice3d["liver"] == pytest.approx(np.mean(per_volume))


def test_subset_evaluation_is_stratified(model):
    ev = Evaluator(_samples())
    idx = ev.subset(4, seed=1)
    assert len(idx) == 4
    assert {ev.samples[i].task.name for i in idx} == {"liver", "spleen"}
    res = ev.evaluate(model, Preprocessor("sam", TINY.img_size), indices=idx)
    assert np.isfinite(res.per_sample[idx]).all()
    assert np.isnan(np.delete(res.per_sample, idx)).all()
    assert ev.encoder_passes == len({ev.image_of[i] for i in idx})


def test_cache_is_bounded_by_bytes_least_recently_used_first(model):
    ev = Evaluator(_samples(), batch_size=4)
    prep = Preprocessor("sam", TINY.img_size)
    ev.evaluate(model, prep, key="enc-A")
    one_set = ev.cached_bytes
    assert one_set > 0
    ev.cache_bytes = 2 * one_set
    ev.evaluate(model, prep, key="enc-B")
    ev.evaluate(model, prep, key="enc-A")  # A is now the most recently used
    ev.evaluate(model, prep, key="enc-C")  # over budget: B goes, A stays
    assert ev.cached_bytes <= 2 * one_set and ev.encoder_passes == 18
    ev.evaluate(model, prep, key="enc-A")
    assert ev.encoder_passes == 18
    ev.evaluate(model, prep, key="enc-B")
    assert ev.encoder_passes == 24
    ev.cache_bytes = 0  # the set in use is never dropped
    ev.evaluate(model, prep, key="enc-B")
    assert ev.encoder_passes == 24 and ev.cached_bytes == one_set


def test_promoted_subsets_reuse_the_embeddings_of_lower_budgets(model):
    ev = Evaluator(_samples(), batch_size=4)
    prep = Preprocessor("sam", TINY.img_size)
    small, large = ev.subset(4), ev.subset(8)
    assert set(small) <= set(large)
    ev.evaluate(model, prep, key="enc-A", indices=small)
    first = ev.encoder_passes
    ev.evaluate(model, prep, key="enc-A", indices=large)
    assert ev.encoder_passes == len({ev.image_of[i] for i in large})  # only the new slices were encoded
    assert first < ev.encoder_passes


def test_batched_encoding_equals_slice_by_slice(model):
    """The default batch (``batch_size_for``: 1 on a CPU) and an explicit batch of 4 give the embeddings of the
    encoder applied to each slice alone, and the same masks and Dice."""
    from medsamix.models.encoding import batch_size_for

    assert batch_size_for(model.image_encoder, "cpu") == 1
    prep = Preprocessor("sam", TINY.img_size)
    model.eval()
    by_batch = {}
    for batch in (None, 4):
        ev = Evaluator(_samples(), batch_size=batch)
        res = ev.evaluate(model, prep, key="enc")
        assert ev.encoder_passes == ev.num_images == 6
        assert len(ev._cache) == 1  # one encoder fingerprint (key, style, size, CT window)
        by_batch[batch] = (res, ev.predict(model, prep, key="enc"), next(iter(ev._cache.values())))
    with torch.no_grad():
        alone = [model.image_encoder(prep.images(img))[0] for img in Evaluator(_samples()).images]
    for batch, (res, preds, emb) in by_batch.items():
        for i, e in enumerate(alone):
            torch.testing.assert_close(emb[i], e, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(res.per_sample, by_batch[None][0].per_sample)
        assert res.dice3d == by_batch[None][0].dice3d
        assert all(np.array_equal(preds[i], by_batch[None][1][i]) for i in preds)
