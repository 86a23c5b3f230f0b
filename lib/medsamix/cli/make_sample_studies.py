"""Write the demo server's sample studies: a MONAI Label datastore folder (images + labels/final, NIfTI).

    medsamix-make-sample-studies --out .demo/studies     # or: .venv/bin/python scripts/make_sample_studies.py

With ``../shared/data/hippocampus`` present it copies a few real T1 MRI crops from the hippocampus *test* split
(never a pool-training or calibration patient); otherwise, or with ``--phantoms``, it generates synthetic 3D
phantoms (an ellipsoid and a blob per volume, RAS- and LPS-oriented). See :mod:`medsamix.demo.sample_studies`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medsamix.cli import REPO, SHARED_DATA
from medsamix.data.tasks import training_study_ids
from medsamix.models.pool import PoolManifest
from medsamix.demo.sample_studies import copy_hippocampus, write_phantoms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="datastore folder to write (created)")
    ap.add_argument("--count", type=int, default=5, help="number of studies (default 5)")
    ap.add_argument("--shared", type=Path, default=SHARED_DATA, help="shared real-image data")
    ap.add_argument("--pool", type=Path, default=REPO / "sample-data" / "pool",
                    help="pool folder whose training_studies are excluded")
    ap.add_argument("--phantoms", action="store_true", help="generate phantoms even when real data is present")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.count < 1:
        print("error: --count must be >= 1", file=sys.stderr)
        return 2
    if args.out.exists() and any(p for p in args.out.iterdir() if not p.name.startswith(".")):
        print(f"error: {args.out} is not empty; remove it or choose another --out", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.phantoms and (args.shared / "hippocampus" / "images").is_dir():
        exclude = training_study_ids(PoolManifest.load(args.pool).training_studies)
        ids = copy_hippocampus(args.out, args.shared, exclude, args.count)
        print(f"copied {len(ids)} hippocampus test-split studies into {args.out}: {', '.join(ids)}")
    else:
        ids = write_phantoms(args.out, args.count, args.seed)
        print(f"wrote {len(ids)} phantom studies into {args.out}: {', '.join(ids)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
