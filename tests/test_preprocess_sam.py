"""The "sam" preprocessing style is segment_anything's own input convention: ``ResizeLongestSide`` for the resize
and the prompts, ``Sam.preprocess`` for normalisation and padding, ``Sam.postprocess_masks`` for the masks; and the
one prompt -> mask forward pass (:mod:`medsamix.models.forward`) is ``SamPredictor``'s."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide

from conftest import TINY
from medsamix.models.forward import predict_masks
from medsamix.models.preprocess import Preprocessor

SIZES = [(40, 64), (64, 37), (23, 23), (100, 71)]  # (H, W): wider, taller, square, larger than the input


@pytest.fixture(scope="module")
def sam() -> torch.nn.Module:
    torch.manual_seed(0)
    return TINY.build().eval()


def _slice(hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, hw).astype(np.float32)


@pytest.mark.parametrize("hw", SIZES)
def test_images_are_resize_longest_side_then_sam_preprocess(sam, hw):
    prep = Preprocessor("sam", TINY.img_size)
    image = _slice(hw)
    ours = prep.images(image[None])
    transform = ResizeLongestSide(TINY.img_size)
    size = transform.get_preprocess_shape(hw[0], hw[1], TINY.img_size)
    assert prep.resized_hw(hw) == size
    # apply_image_torch's interpolation (the method reads the size from a BCHW tensor's B and C dimensions)
    x = torch.from_numpy(image)[None, None].expand(1, 3, *hw)
    resized = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
    theirs = sam.preprocess(resized)
    assert ours.shape == theirs.shape == (1, 3, TINY.img_size, TINY.img_size)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # and with SamPredictor's own path (apply_image: PIL resize of a uint8 RGB image) on a slice that needs no
    # resize, the normalisation and padding agree exactly
    if max(hw) == TINY.img_size:
        rgb = np.repeat(np.round(image).astype(np.uint8)[..., None], 3, axis=2)
        predictor = SamPredictor(sam)
        predictor.set_image(rgb)
        want = sam.preprocess(torch.from_numpy(transform.apply_image(rgb)).permute(2, 0, 1)[None].float())
        assert torch.allclose(prep.images(np.round(image)[None]), want, atol=1e-5)
        assert predictor.input_size == size and predictor.original_size == hw


@pytest.mark.parametrize("hw", SIZES)
def test_boxes_and_points_are_apply_boxes_and_apply_coords(hw):
    prep = Preprocessor("sam", TINY.img_size)
    transform = ResizeLongestSide(TINY.img_size)
    rng = np.random.default_rng(1)
    boxes = np.sort(rng.uniform(0, min(hw), (5, 2, 2)), axis=1).reshape(5, 4).astype(np.float32)
    points = rng.uniform(0, min(hw), (3, 4, 2)).astype(np.float32)
    np.testing.assert_allclose(prep.boxes(boxes, hw).numpy(), transform.apply_boxes(boxes, hw), atol=1e-5)
    np.testing.assert_allclose(prep.points(points, hw).numpy(), transform.apply_coords(points, hw), atol=1e-5)
    np.testing.assert_allclose(prep.boxes(boxes, hw).numpy(),
                               transform.apply_boxes_torch(torch.from_numpy(boxes), hw).numpy(), atol=1e-5)


@pytest.mark.parametrize("hw", SIZES)
def test_masks_are_sam_postprocess_masks(sam, hw):
    prep = Preprocessor("sam", TINY.img_size)
    low = torch.randn(2, 3, TINY.img_size // 4, TINY.img_size // 4, generator=torch.Generator().manual_seed(2))
    want = sam.postprocess_masks(low, prep.resized_hw(hw), hw)
    assert torch.allclose(prep.masks(low, hw), want, atol=1e-5)


@pytest.mark.parametrize("hw, multimask, prompt", [
    ((40, 64), False, "box"), ((64, 37), True, "point"), ((100, 71), False, "box+points")])
@torch.no_grad()
def test_forward_pass_is_sam_predictors(sam, hw, multimask, prompt):
    """``predict_masks`` (slice-pixel prompts -> masks) against ``SamPredictor.predict`` on the same image input."""
    prep = Preprocessor("sam", TINY.img_size)
    image = _slice(hw, 3)
    predictor = SamPredictor(sam)
    # set_torch_image takes the resized image (SamPredictor.set_image resizes with PIL, in uint8) and applies
    # Sam.preprocess itself: the model input prep.images gives (see the first test)
    resized = F.interpolate(torch.from_numpy(image)[None, None].expand(1, 3, *hw), prep.resized_hw(hw),
                            mode="bilinear", align_corners=False, antialias=True)
    predictor.set_torch_image(resized, hw)
    box = np.array([5, 4, hw[1] - 6, hw[0] - 3], dtype=np.float32) if "box" in prompt else None
    pts = np.array([[hw[1] / 2, hw[0] / 2], [3, 2]], dtype=np.float32)[: 1 if prompt == "point" else 2]
    labels = np.array([1, 0])[: len(pts)]
    use_points = "point" in prompt
    masks, scores, _ = predictor.predict(pts if use_points else None, labels if use_points else None, box,
                                         multimask_output=multimask)
    want = masks[int(np.argmax(scores))] if multimask else masks[0]
    assert torch.allclose(predictor.features, sam.image_encoder(prep.images(image[None])), atol=1e-4)
    ours = predict_masks(sam, prep, predictor.features, hw, None if box is None else box[None],
                         pts[None] if use_points else None, labels[None] if use_points else None, multimask)
    assert ours.shape == (1, *hw)
    np.testing.assert_array_equal(ours[0], want)
