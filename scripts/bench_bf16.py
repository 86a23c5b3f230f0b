#!/usr/bin/env python
"""bf16 autocast of the image encoder versus fp32: Dice difference (CUDA; on a CPU both runs are fp32).

    python scripts/bench_bf16.py [--device cuda] [--slices 8] [--vit-b-slices 2]

* The embedded tiny pool's base model (trained, ``sample-data/pool``) segments ``--slices`` slices of the phantom
  volume (``sample_studies.phantom_volume``) from the label's tight box, in fp32 and with bf16 autocast; the mean Dice
  against the label is printed for both and their difference.
* A random ViT-B (no trained weights here, so no Dice against a label): the Dice agreement between its fp32 and bf16
  masks on ``--vit-b-slices`` slices.

Last line: ``dice_fp32=<x> dice_bf16=<x> dice_diff=<bf16 - fp32> vit_b_agreement=<x> device=<d>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
from medsamix.data.slices import tight_box
from medsamix.demo.sample_studies import phantom_volume
from medsamix.models.encoding import default_device
from medsamix.models.preprocess import Preprocessor
from medsamix.serving.prompts import SlicePrompt
from medsamix.serving.segmenter import Segmenter
from medsamix.serving.service import load_served_pool, member_model


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def masks(model: torch.nn.Module, prep: Preprocessor, volume: np.ndarray, label: np.ndarray, ks: list[int],
          device: str, bf16: bool) -> list[np.ndarray]:
    """One box-prompted mask per slice ``k`` (box = the label's tight box on that slice)."""
    seg = Segmenter(model, prep, f"bf16={bf16}", device=device, bf16=bf16)
    none = (np.zeros((0, 2), np.float32), np.zeros(0, np.int64))
    return [seg.predict_slice("v", volume, SlicePrompt(k, tight_box(label[:, :, k] > 0), *none)) for k in ks]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--vit-b-slices", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    image, label = phantom_volume(np.random.default_rng(0))
    volume = (image / image.max() * 255).astype(np.float32)
    ks = [k for k in range(volume.shape[2]) if (label[:, :, k] > 0).any()]
    ks = ks[:: max(1, len(ks) // args.slices)][:args.slices]
    served = member_model(load_served_pool(REPO / "sample-data" / "pool"), "sam_tiny")
    got = {bf16: masks(served.model, served.prep, volume, label, ks, args.device, bf16) for bf16 in (False, True)}
    d = {bf16: float(np.mean([dice(m, label[:, :, k] > 0) for m, k in zip(got[bf16], ks)])) for bf16 in got}
    kb = ks[: args.vit_b_slices]
    agree = float("nan")  # --vit-b-slices 0: ViT-B skipped
    if kb:
        from segment_anything import sam_model_registry

        vit_b = sam_model_registry["vit_b"]().eval()
        vb = {bf16: masks(vit_b, Preprocessor("sam", 1024), volume, label, kb, args.device, bf16)
              for bf16 in (False, True)}
        agree = float(np.mean([dice(a, b) for a, b in zip(vb[False], vb[True])]))
    note = "" if args.device.startswith("cuda") else ": bf16 autocast is CUDA-only, both runs fp32"
    print(f"tiny base on {len(ks)} slices: Dice fp32 {d[False]:.4f}, bf16 {d[True]:.4f}; ViT-B fp32/bf16 mask "
          f"agreement on {len(kb)} slices {agree:.4f} ({args.device}{note})")
    print(f"dice_fp32={d[False]:.4f} dice_bf16={d[True]:.4f} dice_diff={d[True] - d[False]:+.4f} "
          f"vit_b_agreement={agree:.4f} device={args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
