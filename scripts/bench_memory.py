#!/usr/bin/env python
"""Peak resident memory of a search and of the server, against (K + 2) x model size + cache cap.

Every case runs in a fresh subprocess of this script, which reports its own peak resident set size (the kernel's
``ru_maxrss``, ``getrusage(RUSAGE_SELF)`` at its end), so one case cannot inherit another's peak. Cases:

* ``baseline``       - python, torch, segment_anything and the medsamix modules the other cases import; nothing
                       else. Its peak is the process baseline, printed separately.
* ``tiny_search``    - a 120-trial search (``run_search``, single task, granularity 2, SAM preprocessing) with the
                       embedded tiny pool (``sample-data/pool``, K = 2) on the box-prompted slices of 2 synthetic
                       phantom volumes (``medsamix.demo.sample_studies.phantom_volume``).
* ``merger_vitb``    - the merger alone: random-weight ViT-B base + 2 models (``bench_merge.make_checkpoints``),
                       ``Merger.prepare()`` and 12 random layer-wise configurations over every method, with the
                       merger's default memo cap (0: DARE fields drawn again per merge).
* ``merger_vitb_memo`` - the same with no memo cap (``memo_bytes=None``): every method's memo kept for every tensor,
                       (DARE's random fields and TIES' sorted magnitudes; SLERP, which kept a centroid vector
                       before, keeps K + 1 numbers per tensor in both cases).
* ``vitb_search``    - a 30-trial search on that ViT-B pool with ``--vitb-slices`` calibration slices (default 1:
                       the ViT-B encoder takes ~16 s per slice on a 2-core CPU, and most trials change the encoder).
* ``server_vitb``    - the library's serving path (``PoolLoader`` -> ``MergedModelSource`` -> ``InteractiveService``,
                       as the app builds it, without MONAI Label) with the ViT-B pool of three: the merged model (the
                       pool's uniform linear merge, nothing published) serves a 2D box prompt, the same prompt again
                       and a 3D box over 3 slices on a phantom volume. Background pre-encoding is off (it would only
                       fill the embedding cache, whose cap is counted).
* ``server_vitb_former`` - the same as the server was before: segment_anything's stock attention (the child runs
                       with ``MEDSAMIX_CHUNKED_ATTENTION=0``) and a second copy of the merged weights held next to the
                       served module (the former ``MergedModelSource.uniform`` loaded the merger's state into a new
                       ``Sam``).

Every search and server case builds its models with :class:`~medsamix.models.attention.ChunkedAttention` (the
default) unless named ``_former``.

Figures per case: peak RSS, model size (bytes of the base's state dict), K, the cache cap (the configured bytes of
the caches the case uses: the evaluator's embedding cache in a search; the embedding cache plus the volume cache in
the server; 0 for the merger alone), the bytes those caches actually held at the end, and

* ``ratio``        = peak RSS / ((K + 2) x model size + cache cap)   (the issue's target: <= 1.3). The process
  baseline is NOT subtracted: it is part of the peak.
* ``ratio_net``    = (peak RSS - baseline peak) / ((K + 2) x model size + cache cap), for reference.
* ``ratio_used``   = peak RSS / ((K + 2) x model size + cache bytes actually held), a stricter reading.

    PYTHONPATH=$PWD/lib .venv/bin/python scripts/bench_memory.py                 # every case
    PYTHONPATH=$PWD/lib .venv/bin/python scripts/bench_memory.py --cases baseline,tiny_search

Last line: ``<case>_peak_mb=<MB> <case>_ratio=<x> ...`` for every case run (baseline: peak only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the child cases import bench_merge from this folder (sys.path[0])

CASES = ("baseline", "merger_vitb_memo", "merger_vitb", "server_vitb_former", "server_vitb", "tiny_search",
         "vitb_search")
MB = 2**20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Phases:
    """Resident memory (VmRSS), its file-backed part (RssFile: shared libraries' pages) and the peak so far (VmHWM)
    at named points of a case, in MB."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, float]] = []

    def mark(self, name: str) -> None:
        self.rows.append((name, _status_kb("VmRSS") / 1024, _status_kb("RssFile") / 1024, _status_kb("VmHWM") / 1024))


def _imports() -> None:
    import numpy  # noqa: F401
    import segment_anything  # noqa: F401
    import torch  # noqa: F401

    import medsamix.merging.merger  # noqa: F401
    import medsamix.search.search  # noqa: F401
    import medsamix.serving.service  # noqa: F401


def _state_bytes(sd: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def _phantom_slices(volumes: int, seed: int = 0) -> list[Any]:
    """Box-prompted slices (axis 2) of label 1 ("ellipsoid") of synthetic phantom volumes."""
    import numpy as np

    from medsamix.data.slices import SliceSample, tight_box
    from medsamix.data.tasks import Task
    from medsamix.demo.sample_studies import phantom_volume

    rng = np.random.default_rng(seed)
    task = Task("ellipsoid", 1)
    out = []
    for v in range(volumes):
        image, label = phantom_volume(rng)
        image255 = (255 * (image - image.min()) / max(1e-6, float(np.ptp(image)))).astype(np.float32)
        for k in range(image.shape[2]):
            mask = label[:, :, k] == 1
            if mask.sum() >= 20:
                out.append(SliceSample(f"phantom_{v}", task, 2, k, image255[:, :, k].copy(), mask, tight_box(mask)))
    return out


def _search(pool: Any, slices: list[Any], trials: int, phases: Phases) -> dict[str, Any]:
    from medsamix.merging.merger import Merger
    from medsamix.search.evaluate import Evaluator
    from medsamix.search.search import SearchSettings, run_search

    settings = SearchSettings(tasks=("ellipsoid",), trials=trials, preprocessing="sam")
    merger = Merger(pool, settings.granularity, settings.separate)
    evaluator = Evaluator(slices)
    phases.mark("merger and evaluator built")
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = run_search(merger, evaluator, settings, out)
        seconds = time.perf_counter() - t0
    phases.mark(f"{trials} trials done")
    return {"cache_cap": evaluator.cache_bytes + (merger.memo.max_bytes or 0),
            "cache_used": evaluator.cached_bytes + merger.memo.nbytes, "seconds": round(seconds, 1),
            "detail": f"{len(result.trials)} trials, {len(slices)} calibration slices, {result.encoder_passes} "
                      f"encoder passes, best calibration Dice {result.best.dice['ellipsoid']:.3f}"}


def _vitb_pool(work: Path) -> Any:
    from bench_merge import make_checkpoints

    from medsamix.models.pool import ModelPool

    paths = {a: work / f"{a}.pth" for a in ("sam", "ft1", "ft2")}
    if not all(p.is_file() for p in paths.values()):
        make_checkpoints(work, 2, noise=0.02)
    return ModelPool.load(("sam", paths["sam"]), {"ft1": paths["ft1"], "ft2": paths["ft2"]})


def run_case(case: str, work: Path, vitb_slices: int, phases: Phases) -> dict[str, Any]:
    """Run one case in this process; returns its figures (model size, K, cache cap and use, details)."""
    _imports()
    import random

    import torch

    torch.set_grad_enabled(False)
    phases.mark("imports")
    if case == "baseline":
        return {"model_bytes": 0, "k": 0, "cache_cap": 0, "cache_used": 0, "detail": "imports only"}
    if case == "tiny_search":
        from medsamix.models.pool import PoolManifest

        pool = PoolManifest.load(ROOT / "sample-data" / "pool").load_pool()
        phases.mark("pool loaded")
        model_bytes = _state_bytes(pool.base.state_dict)
        return {"model_bytes": model_bytes, "k": len(pool.models), **_search(pool, _phantom_slices(2), 120, phases)}
    pool = _vitb_pool(work)
    model_bytes = _state_bytes(pool.base.state_dict)
    k = len(pool.models)
    phases.mark("pool loaded")
    if case.startswith("merger_vitb"):
        from medsamix.merging.config import MergeConfig
        from medsamix.merging.methods import REGISTRY
        from medsamix.merging.merger import Merger

        unbounded = case.endswith("_memo")
        merger = Merger(pool, granularity=2, memo_bytes=None if unbounded else 0)
        phases.mark("merger built")
        t0 = time.perf_counter()
        merger.prepare()
        prepare_s = time.perf_counter() - t0
        phases.mark("prepared (memos the cap has room for)")
        rng = random.Random(0)
        t0 = time.perf_counter()
        for _ in range(12):
            merger.apply(MergeConfig.random(merger.groups, merger.aliases, rng, 2, methods=sorted(REGISTRY)))
        merge_s = (time.perf_counter() - t0) / 12
        phases.mark("12 random configurations applied")
        return {"model_bytes": model_bytes, "k": k, "cache_cap": merger.memo.max_bytes or 0,
                "cache_used": merger.memo.nbytes + merger.memo.small_bytes,
                "detail": f"{len(merger.groups)} groups; memo cap {'none' if unbounded else '0'}, held "
                          f"{(merger.memo.nbytes + merger.memo.small_bytes) / MB:.1f} MB; prepare {prepare_s:.1f} s, "
                          f"mean merge {merge_s:.2f} s per random configuration"}
    if case == "vitb_search":
        slices = _phantom_slices(1)
        step = max(1, len(slices) // max(1, vitb_slices))
        return {"model_bytes": model_bytes, "k": k, **_search(pool, slices[::step][:vitb_slices], 30, phases)}
    if case.startswith("server_vitb"):
        import nibabel as nib
        import numpy as np

        from medsamix.data.volumes import VolumeCache
        from medsamix.demo.sample_studies import phantom_affine, phantom_volume
        from medsamix.serving.segmenter import EmbeddingCache
        from medsamix.serving.service import InteractiveService, MergedModelSource, PoolLoader

        image, label = phantom_volume(np.random.default_rng(0))
        path = work / "phantom.nii.gz"
        nib.save(nib.Nifti1Image(image, phantom_affine(image.shape, lps=False)), str(path))
        spec = ",".join(f"{a}={work / (a + '.pth')}" for a in ("sam", "ft1", "ft2"))
        del pool
        loader = PoolLoader(models=spec)
        source = MergedModelSource(loader, work / "published")
        volumes, cache = VolumeCache(), EmbeddingCache()
        service = InteractiveService("medsamix", source.get, volumes, cache, preencoder=None)
        ii, jj, kk = np.nonzero(label == 1)
        k = int(np.median(kk))
        roi = [int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), k, k]
        held = []
        if case.endswith("_former"):  # the former uniform merge: the merger's weights copied into a second Sam
            held.append({n: t.clone() for n, t in source.get().model.state_dict().items()})
        masks = []
        for request in ({"roi": roi, "mode": "2d"}, {"roi": roi, "mode": "2d"},
                        {"roi": roi[:4] + [k - 1, k + 1], "mode": "3d"}):
            masks.append(service.run(path, request).params)
            phases.mark(f"prompt {len(masks)} ({request['mode']}) served")
        return {"model_bytes": model_bytes, "k": len(loader.aliases) - 1,
                "cache_cap": cache.max_bytes + volumes.max_bytes, "cache_used": cache.nbytes + image.nbytes,
                "detail": f"3 prompts (2D, 2D repeat, 3D over 3 slices), voxels "
                          f"{[p['voxels'] for p in masks]}, pre-encoding off, "
                          f"{'stock attention + second weight copy (former)' if held else 'chunked attention'}"}
    raise SystemExit(f"unknown case {case!r}; cases: {', '.join(CASES)}")


def spawn(case: str, work: Path, vitb_slices: int, timeout: float) -> tuple[dict[str, Any], float, float]:
    """Run ``case`` in a fresh child; returns its figures, its peak RSS in MB (``ru_maxrss``) and wall seconds."""
    cmd = [sys.executable, __file__, "--child", case, "--work", str(work), "--vitb-slices", str(vitb_slices)]
    env = dict(os.environ)
    if case.endswith("_former"):
        env["MEDSAMIX_CHUNKED_ATTENTION"] = "0"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SystemExit(f"case {case} ran past {timeout} s")
    # RUSAGE_CHILDREN keeps the maximum over all children reaped so far, so each child reports its own ru_maxrss
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed with status {proc.returncode}")
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    figures = json.loads(line[len("RESULT "):])
    return figures, figures["maxrss_kb"] / 1024, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, among {', '.join(CASES)}")
    ap.add_argument("--vitb-slices", type=int, default=1, help="calibration slices of the ViT-B search")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import resource

        phases = Phases()
        figures = run_case(args.child, args.work, args.vitb_slices, phases)
        figures["phases"] = phases.rows
        figures["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("RESULT " + json.dumps(figures), flush=True)
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"error: unknown case(s) {unknown}; cases: {', '.join(CASES)}", file=sys.stderr)
        return 2
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; load average "
          f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the start")
    base_mb = None
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            fig, peak, seconds = spawn(case, Path(tmp), args.vitb_slices, args.timeout)
            print(f"\n[{case}] {fig['detail']}; {seconds:.0f} s")
            for name, rss, rss_file, hwm in fig["phases"]:
                print(f"  {name:40s} rss {rss:6.0f} MB (file-backed {rss_file:4.0f})   peak so far {hwm:6.0f} MB")
            if case == "baseline":
                base_mb = peak
                print(f"  peak {peak:.0f} MB (process baseline)")
                summary.append(f"baseline_peak_mb={peak:.0f}")
                continue
            size, k = fig["model_bytes"] / MB, fig["k"]
            cap, used = fig["cache_cap"] / MB, fig["cache_used"] / MB
            budget = (k + 2) * size + cap
            ratio = peak / budget
            line = (f"  peak {peak:.0f} MB; model {size:.1f} MB, K = {k}, cache cap {cap:.0f} MB (held {used:.1f} "
                    f"MB); (K+2) x model + cap = {budget:.0f} MB; ratio {ratio:.3f}")
            if base_mb is not None:
                line += f"; ratio_net (peak - baseline {base_mb:.0f} MB) {(peak - base_mb) / budget:.3f}"
            line += f"; ratio_used {peak / ((k + 2) * size + used):.3f}"
            print(line)
            summary.append(f"{case}_peak_mb={peak:.0f} {case}_ratio={ratio:.3f}")
    print(f"\nload average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    print(" ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
