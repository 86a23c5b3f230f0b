"""The interactive training objective on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY
from medsamix.demo.phantoms import shapes_image
from medsamix.models.preprocess import Preprocessor
from medsamix.demo.training import PromptPolicy, _correction_point, mask_loss, train_step


def test_shapes_are_seeded_and_masks_disjoint():
    a_img, a_masks = shapes_image(np.random.default_rng(3), 64)
    b_img, b_masks = shapes_image(np.random.default_rng(3), 64)
    np.testing.assert_array_equal(a_img, b_img)
    assert len(a_masks) == len(b_masks) >= 1
    total = np.sum(a_masks, axis=0)
    assert total.max() == 1  # visible parts of different objects never overlap
    assert a_img.min() >= 0 and a_img.max() <= 255


def test_mask_loss_prefers_the_right_mask():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    good = (target - 0.5) * 20
    logits = torch.cat([good, -good, torch.zeros_like(good)], dim=1)
    losses = mask_loss(logits, target)
    assert losses.shape == (3,) and int(torch.argmin(losses)) == 0


def test_correction_point_targets_the_error():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 0:4, 0:4] = 1
    logits = torch.full((1, 1, 8, 8), -5.0)  # predicts nothing: every error is a false negative
    coords, labels = _correction_point(logits, target, np.random.default_rng(0))
    x, y = coords[0, 0].tolist()
    assert labels.item() == 1.0 and x < 16 and y < 16  # inside the object (low-res 4x4 -> input 16x16 px)
    assert _correction_point((target - 0.5) * 10, target, np.random.default_rng(0)) is None


@pytest.mark.parametrize("policy", [PromptPolicy(1.0, 0.0, 0), PromptPolicy(0.0, 1.0, 2), PromptPolicy(0.5, 0.5, 1)])
def test_train_step_gives_gradients(policy):
    torch.manual_seed(0)
    model = TINY.build().train()
    rng = np.random.default_rng(0)
    batch = [(img, masks[0]) for img, masks in (shapes_image(rng, 48) for _ in range(2))]
    loss = train_step(model, batch, Preprocessor("sam", TINY.img_size), policy, rng)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert model.mask_decoder.output_upscaling[0].weight.grad.abs().sum() > 0
    assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
