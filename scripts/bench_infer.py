#!/usr/bin/env python
"""Interactive latency: the first prompt on a slice versus repeated prompts on the same (already embedded) slice.

    .venv/bin/python scripts/bench_infer.py [--repeats 10] [--vit-b-firsts 2] [--out results/bench_infer.md]

On one synthetic volume (``sample_studies.phantom_volume``, 96 x 80 x 32), the server's own segmenter
(``medsamix.serving.segmenter.Segmenter``, the code behind every infer task) is timed in one run for

* the embedded tiny pool's base model (``sample-data/pool``, 256 px), and
* a randomly initialised SAM ViT-B (``segment_anything.sam_model_registry["vit_b"]()``, 1024 px; the image encoder
  takes about 16 s per slice on 2 CPU cores, so only a few first prompts).

Each model gets one untimed warm-up prompt first.

Pre-encoding (``medsamix.serving.preencode.PreEncoder``, the server's background encoder): a volume is opened under a
new image key with the middle slice as centre and a budget of ``--*-preencode`` slices; ``volume_encode_s`` is the
wall time until those slices are encoded (ViT-B: a few slices only, ~16 s each here, so it is *not* a whole volume;
the slice count is printed). Then ``preencoded_ms`` is the median of 2D box prompts on ``--preencoded-prompts``
distinct pre-encoded slices never prompted before (one each, nearest the middle first), and
``preencoded_over_decoder`` that median over the median of the same prompts' decoder parts; a 3D box over the pre-encoded slices gives ``3d_preencoded_over_decoder`` (its total / the sum of its decoder
passes). ``3d_cold_over_encoder``: a 3D box over the same slice range of a volume never seen (total / the sum of the
encoder passes it needed).

A first prompt on a slice pays the image encoder; a repeated prompt (another box on the same slice) finds the slice's
embedding in the cache and pays only the prompt encoder and mask decoder plus post-processing. Figures are the
segmenter's server-side latencies (``total_ms`` of a 2D box request, ``decoder_ms`` its prompt encoder + mask
decoder part); medians over the repetitions. The last line (ViT-B figures) is
``first_ms=<ms> repeat_ms=<ms> decoder_ms=<ms> repeat_over_decoder=<x> preencoded_ms=<ms> preencoded_over_decoder=<x>
volume_encode_s=<s>`` (one line), preceded by a line with the two 3D ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
from medsamix.models.preprocess import Preprocessor
from medsamix.serving.preencode import PreEncoder
from medsamix.serving.prompts import parse_prompt
from medsamix.demo.sample_studies import phantom_volume
from medsamix.serving.segmenter import Segmenter
from medsamix.serving.service import load_served_pool, member_model


def _boxes(rng: np.random.Generator, shape: tuple[int, int, int], k: int, n: int) -> list[list[int]]:
    """``n`` random rois on slice ``k`` (Slicer's [i_a, i_b, j_a, j_b, k, k])."""
    out = []
    for _ in range(n):
        i0, j0 = rng.integers(0, shape[0] // 2), rng.integers(0, shape[1] // 2)
        i1, j1 = i0 + rng.integers(8, shape[0] // 2), j0 + rng.integers(8, shape[1] // 2)
        out.append([int(i0), int(i1), int(j0), int(j1), k, k])
    return out


def bench(name: str, seg: Segmenter, volume: np.ndarray, firsts: int, repeats: int, seed: int) -> dict[str, float]:
    """Time ``firsts`` first prompts (each on a new slice) and ``repeats`` repeated prompts on the last one.

    One untimed warm-up prompt (under another image key) runs first, so one-time costs (allocator, kernel selection)
    are not counted as a first prompt."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in volume.shape)
    seg.segment(f"{name}-warm-up", volume, parse_prompt({"roi": _boxes(rng, shape, 0, 1)[0]}, shape))
    first_ms, first_enc = [], []
    k = shape[2] // 2
    for n in range(firsts):
        k = shape[2] // 2 + n
        roi = _boxes(rng, shape, k, 1)[0]
        r = seg.segment(name, volume, parse_prompt({"roi": roi}, shape)).latency
        assert not r.cache_hit, "a first prompt must run the image encoder"
        first_ms.append(r.total_ms)
        first_enc.append(r.encoder_ms)
    rep_total, rep_dec = [], []
    for roi in _boxes(rng, shape, k, repeats):
        r = seg.segment(name, volume, parse_prompt({"roi": roi}, shape)).latency
        assert r.cache_hit and r.encoder_ms == 0, "a repeated prompt must not run the image encoder"
        rep_total.append(r.total_ms)
        rep_dec.append(r.decoder_ms)
    return {"first_ms": statistics.median(first_ms), "encoder_ms": statistics.median(first_enc),
            "repeat_ms": statistics.median(rep_total), "decoder_ms": statistics.median(rep_dec),
            "firsts": firsts, "repeats": repeats}


def bench_preencode(name: str, seg: Segmenter, volume: np.ndarray, budget: int, seed: int,
                    prompts: int) -> dict[str, float]:
    """Pre-encode ``budget`` slices around the middle one, then prompt them in 2D and 3D; a cold 3D prompt for scale.

    2D: one box prompt on each of up to ``prompts`` pre-encoded slices (medians). The 3D range is the ``min(budget, 3)`` slices nearest the middle (all pre-encoded)."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in volume.shape)
    mid = shape[2] // 2
    pre = PreEncoder(max_slices=budget)
    key = f"{name}-opened"
    t0 = time.perf_counter()
    pre.schedule(seg, key, volume, center=mid)
    pre.wait()
    encode_s = time.perf_counter() - t0
    pre.stop()
    # 2D prompts on pre-encoded slices never prompted before (nearest the middle first), one prompt each
    order = sorted(range(shape[2]), key=lambda i: (abs(i - mid), i))
    slices = [i for i in order if seg.cache.is_preencoded((key, i, seg.version))][:prompts]
    pre_total, pre_dec = [], []
    for k in slices:
        r = seg.segment(key, volume, parse_prompt({"roi": _boxes(rng, shape, k, 1)[0]}, shape)).latency
        assert r.cache_misses == 0 and r.preencoded_hits == 1, "a pre-encoded slice must not run the image encoder"
        pre_total.append(r.total_ms)
        pre_dec.append(r.decoder_ms)
    n3 = min(budget, 3)
    lo = mid - (n3 - 1) // 2 if n3 == 3 else mid
    span = [lo, lo + n3 - 1]
    i0, i1 = shape[0] // 4, 3 * shape[0] // 4
    j0, j1 = shape[1] // 4, 3 * shape[1] // 4
    roi3 = {"roi": [i0, i1, j0, j1, span[0], span[1]]}
    warm3 = seg.segment(key, volume, parse_prompt(roi3, shape)).latency
    assert warm3.cache_misses == 0
    cold3 = seg.segment(f"{name}-cold-3d", volume, parse_prompt(roi3, shape)).latency
    return {"preencoded_ms": statistics.median(pre_total), "preencoded_decoder_ms": statistics.median(pre_dec),
            "preencoded_prompts": len(slices), "volume_encode_s": encode_s, "preencoded_slices": budget, "3d_slices": warm3.cache_hits, "3d_cold_slices": cold3.cache_misses,
            "3d_preencoded_over_decoder": warm3.total_ms / warm3.decoder_ms,
            "3d_cold_over_encoder": cold3.total_ms / cold3.encoder_ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=Path, default=REPO / "sample-data" / "pool")
    ap.add_argument("--repeats", type=int, default=10, help="repeated prompts per model (default 10)")
    ap.add_argument("--tiny-firsts", type=int, default=8, help="first prompts for the tiny model (default 8)")
    ap.add_argument("--vit-b-firsts", type=int, default=2, help="first prompts for ViT-B (default 2, ~16 s each)")
    ap.add_argument("--tiny-preencode", type=int, default=32, help="slices pre-encoded for the tiny model (32)")
    ap.add_argument("--vit-b-preencode", type=int, default=3, help="slices pre-encoded for ViT-B (default 3)")
    ap.add_argument("--preencoded-prompts", type=int, default=5,
                    help="2D prompts on distinct pre-encoded slices, median reported (default 5; at most the "
                         "pre-encoded slices)")
    ap.add_argument("--device", default="cpu", help="where the models run (default cpu; cuda on a GPU)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the image encoder (CUDA only)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as Markdown to this file")
    args = ap.parse_args()
    if min(args.repeats, args.tiny_firsts, args.vit_b_firsts, args.tiny_preencode, args.vit_b_preencode,
           args.preencoded_prompts) < 1:
        print("error: --repeats, --*-firsts, --*-preencode and --preencoded-prompts must be >= 1", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    image, _ = phantom_volume(np.random.default_rng(0))
    volume = (image / image.max() * 255).astype(np.float32)
    rows = []
    t0 = time.perf_counter()
    served = member_model(load_served_pool(args.pool), "sam_tiny")
    seg = Segmenter(served.model, served.prep, served.version, device=args.device, bf16=args.bf16)
    rows.append(("tiny pool base (sam_tiny, 256 px)",
                 bench("tiny", seg, volume, args.tiny_firsts, args.repeats, 1)
                 | bench_preencode("tiny", seg, volume, args.tiny_preencode, 3, args.preencoded_prompts)))
    from segment_anything import sam_model_registry

    vit_b = sam_model_registry["vit_b"]().eval()
    seg = Segmenter(vit_b, Preprocessor("sam", 1024), "vit_b-random", device=args.device, bf16=args.bf16)
    rows.append(("random ViT-B (1024 px)",
                 bench("vit_b", seg, volume, args.vit_b_firsts, args.repeats, 2)
                 | bench_preencode("vit_b", seg, volume, args.vit_b_preencode, 4, args.preencoded_prompts)))
    lines = [
        "# Interactive latency: first prompt vs repeated prompts on the same slice",
        "",
        "Command: `.venv/bin/python scripts/bench_infer.py"
        + "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k, d in
                  (("repeats", 10), ("tiny_firsts", 8), ("vit_b_firsts", 2), ("tiny_preencode", 32),
                   ("vit_b_preencode", 3), ("preencoded_prompts", 5), ("device", "cpu")) if getattr(args, k) != d)
        + (" --bf16" if args.bf16 else "")
        + (f" --out {args.out}" if args.out else "") + "`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, device {args.device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; image {volume.shape[0]} x {volume.shape[1]} "
        f"x {volume.shape[2]} (2D box prompts); load average at the end "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1/5/15 min; other jobs share the cores). Medians of the "
        "segmenter's server-side latencies.",
        "",
        "| model | first prompt ms (n) | of which encoder ms | repeated prompt ms (n) | decoder ms | repeat / decoder "
        "| pre-encoded prompt ms (n) | pre-encoded / its decoder | pre-encoding s (slices) | 3D pre-encoded / decoder sum "
        "(slices) | 3D cold / encoder sum (slices) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['first_ms']:.1f} ({r['firsts']}) | {r['encoder_ms']:.1f} | "
                     f"{r['repeat_ms']:.1f} ({r['repeats']}) | {r['decoder_ms']:.1f} | "
                     f"{r['repeat_ms'] / r['decoder_ms']:.3f} | {r['preencoded_ms']:.1f} ({r['preencoded_prompts']}) | "
                     f"{r['preencoded_ms'] / r['preencoded_decoder_ms']:.3f} | {r['volume_encode_s']:.2f} "
                     f"({r['preencoded_slices']}) | {r['3d_preencoded_over_decoder']:.3f} ({r['3d_slices']}) | "
                     f"{r['3d_cold_over_encoder']:.3f} ({r['3d_cold_slices']}) |")
    v = rows[-1][1]
    lines += ["", f"Total benchmark time {time.perf_counter() - t0:.0f} s.", "",
              f"3d_cold_over_encoder={v['3d_cold_over_encoder']:.3f} "
              f"3d_preencoded_over_decoder={v['3d_preencoded_over_decoder']:.3f}",
              "",
              f"first_ms={v['first_ms']:.1f} repeat_ms={v['repeat_ms']:.1f} decoder_ms={v['decoder_ms']:.1f} "
              f"repeat_over_decoder={v['repeat_ms'] / v['decoder_ms']:.3f} preencoded_ms={v['preencoded_ms']:.1f} "
              f"preencoded_over_decoder={v['preencoded_ms'] / v['preencoded_decoder_ms']:.3f} "
              f"volume_encode_s={v['volume_encode_s']:.2f}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
