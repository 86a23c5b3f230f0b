"""Download the public SAM-family ViT-B checkpoints for a real pool and print their sha256 for recipes.

    medsamix-download-checkpoints --out checkpoints/

SAM ViT-B comes from Meta's official URL; the file name's suffix (``01ec64``) is the start of the file's MD5,
which is checked. MedSAM and MedicoSAM are distributed through Google Drive / their projects' model registries,
which need an interactive or tool-specific download: the script prints where to get them and verifies any copy
already placed in --out by loading it (architecture and layout check) and printing its sha256.
No network is needed for the verification step.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import urllib.request
from pathlib import Path

from medsamix.atomic import atomic_write
from medsamix.models.checkpoint import load_sam_checkpoint, sha256_file
from medsamix.errors import CheckpointError

SOURCES = {
    "sam": {
        "file": "sam_vit_b_01ec64.pth",
        "url": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "md5_prefix": "01ec64",
    },
    "medsam": {
        "file": "medsam_vit_b.pth",
        "where": "MedSAM (Ma et al., Nature Communications 2024): the 'medsam_vit_b.pth' link in the README of the "
                 "bowang-lab/MedSAM GitHub repository (Google Drive).",
    },
    "medicosam": {
        "file": "medicosam_vit_b.pt",
        "where": "MedicoSAM (Archit et al., 2025): the 'vit_b_medical_imaging' model of micro_sam "
                 "(micro_sam.util.get_sam_model(model_type='vit_b_medical_imaging') downloads and caches it).",
    },
}


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("checkpoints"))
    ap.add_argument("--offline", action="store_true", help="only verify files already in --out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for alias, src in SOURCES.items():
        path = args.out / src["file"]
        if not path.exists() and "url" in src and not args.offline:
            print(f"{alias}: downloading {src['url']}")

            def fetch(tmp: Path, url: str = src["url"], prefix: str = src["md5_prefix"]) -> None:
                urllib.request.urlretrieve(url, tmp)
                if not md5_file(tmp).startswith(prefix):
                    raise OSError(f"MD5 does not start with {prefix}: corrupt download, removed")

            try:
                atomic_write(path, fetch)  # a failed or corrupt download leaves nothing behind
            except OSError as e:
                print(f"{alias}: download failed: {e}", file=sys.stderr)
                status = 1
                continue
        if not path.exists():
            print(f"{alias}: {path} not present. Get it from: {src.get('where', src.get('url'))}")
            continue
        try:
            _, report = load_sam_checkpoint(path)
        except CheckpointError as e:
            print(f"{alias}: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{alias}: {report.summary()} sha256={sha256_file(path)}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
