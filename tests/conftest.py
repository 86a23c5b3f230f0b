"""Shared fixtures: a tiny SAM-architecture spec and checkpoint factories.

Kernel compilation is turned off for the test suite (MEDSAMIX_COMPILE=0) except in tests that compare the fused
kernels with the eager ones explicitly; the computation is the same either way.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MEDSAMIX_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from medsamix.models.architecture import ArchSpec  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY = ArchSpec(
    name="tiny",
    img_size=64,
    patch_size=8,
    encoder_embed_dim=32,
    encoder_depth=4,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1, 3),
    window_size=4,
    prompt_embed_dim=32,
    mask_in_chans=8,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)


def random_state(arch: ArchSpec, seed: int) -> dict[str, torch.Tensor]:
    """State dict of a freshly initialised model of ``arch`` with every float tensor perturbed by seeded noise."""
    torch.manual_seed(seed)
    sd = arch.build().state_dict()
    g = torch.Generator().manual_seed(seed + 1000)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture
def tiny_arch() -> ArchSpec:
    return TINY


@pytest.fixture
def tiny_pool_files(tmp_path: Path) -> dict[str, Path]:
    """Plain-layout checkpoints of a tiny base and two tiny fine-tuned models: alias -> path."""
    out = {}
    for i, alias in enumerate(["sam", "medsam", "medicosam"]):
        out[alias] = tmp_path / f"{alias}.pth"
        torch.save(random_state(TINY, i), out[alias])
    return out


@pytest.fixture(scope="module")
def tiny_segmenter_parts():
    """A tiny ``Sam`` with random weights (seed 0) in eval mode and its SAM-style preprocessor."""
    from medsamix.models.preprocess import Preprocessor

    model = TINY.build()
    model.load_state_dict(random_state(TINY, 0))
    return model.eval(), Preprocessor("sam", TINY.img_size)

# Seconds a test waits for a whole merge run through a server (tiny pool: 1-4 minutes on 2 idle cores; a loaded
# machine takes several times that). A bound, not a speed check: benchmarks measure speed.
RUN_TIMEOUT_S = 900.0
