"""The seeded corruption suite: determinism, shapes, every corruption acts, severity 2 stronger than 1."""

from __future__ import annotations

import numpy as np
import pytest

from medsamix.data.slices import SliceSample
from medsamix.data.tasks import Task
from medsamix.demo.phantoms import shapes_image
from medsamix.search.corruptions import CONDITIONS, CORRUPTIONS, condition_of_samples, corrupt, corrupt_samples


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    img, _ = shapes_image(np.random.default_rng(3), size=96)
    return np.clip(img, 0, 255).astype(np.float32)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_shape_dtype_and_changes(image: np.ndarray, name: str) -> None:
    for severity in (1, 2):
        a = corrupt(image, name, severity, seed=5, key="s|2|7")
        b = corrupt(image, name, severity, seed=5, key="s|2|7")
        assert a.shape == image.shape and a.dtype == image.dtype
        np.testing.assert_array_equal(a, b)
        assert np.abs(a - image).mean() > 0.5, (name, severity)
        assert a.min() >= 0 and a.max() <= 255


@pytest.mark.parametrize("name", ["noise", "motion", "bias"])
def test_seed_and_slice_change_the_draw(image: np.ndarray, name: str) -> None:
    a = corrupt(image, name, 1, seed=5, key="s|2|7")
    assert not np.array_equal(a, corrupt(image, name, 1, seed=6, key="s|2|7"))
    assert not np.array_equal(a, corrupt(image, name, 1, seed=5, key="s|2|8"))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_two_is_stronger(image: np.ndarray, name: str) -> None:
    for seed in range(3):
        d1 = np.abs(corrupt(image, name, 1, seed=seed, key="k") - image).mean()
        d2 = np.abs(corrupt(image, name, 2, seed=seed, key="k") - image).mean()
        assert d2 > d1, (name, seed, d1, d2)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_rgb_slices(image: np.ndarray, name: str) -> None:
    rgb = np.stack([image, image * 0.5, 255 - image], axis=-1)
    out = corrupt(rgb, name, 2, seed=1, key="k")
    assert out.shape == rgb.shape and out.dtype == rgb.dtype
    assert np.abs(out - rgb).mean() > 0.5


def test_bad_input_is_refused(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(image, "rain", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(image, "noise", 3)
    with pytest.raises(ValueError, match="slice"):
        corrupt(image[None], "noise", 1)


def _samples(image: np.ndarray, n_slices: int, tasks: int = 2) -> list[SliceSample]:
    out = []
    for t in range(1, tasks + 1):
        for i in range(n_slices):
            mask = np.zeros(image.shape, bool)
            mask[10:30, 10:30] = True
            out.append(SliceSample("st", Task(f"t{t}", t), 2, i, image + i, mask,
                                   np.array([10, 10, 29, 29], np.float32)))
    return out


def test_suite_same_for_every_call_and_shared_slices(image: np.ndarray) -> None:
    samples = _samples(image, 20)
    a, b = corrupt_samples(samples, seed=2), corrupt_samples(samples, seed=2)
    for x, y, s in zip(a, b, samples):
        np.testing.assert_array_equal(x.image, y.image)
        assert x.mask is s.mask and x.study_id == s.study_id and x.index == s.index
    for i in range(20):  # both tasks see the same corrupted slice
        np.testing.assert_array_equal(a[i].image, a[20 + i].image)
    conds = condition_of_samples(samples, seed=2)
    assert set(conds[:20]) == set(CONDITIONS)
    assert conds[:20] == conds[20:]
    assert not np.array_equal(corrupt_samples(samples, seed=3)[0].image, a[0].image)


def test_with_corrupted_adds_a_corrupted_twin_per_task(image: np.ndarray) -> None:
    from medsamix.search.corruptions import robust_tasks, with_corrupted

    samples = _samples(image, 12)
    both = with_corrupted(samples, seed=1)
    assert both[:24] == samples and len(both) == 48
    assert {s.task.name for s in both[24:]} == {"t1@corrupted", "t2@corrupted"}
    assert all(s.study_id == "st@corrupted" and s.task.value in (1, 2) for s in both[24:])
    assert all(not np.array_equal(c.image, s.image) for c, s in zip(both[24:], samples))
    assert robust_tasks(("t1", "t2")) == ("t1", "t2", "t1@corrupted", "t2@corrupted")
