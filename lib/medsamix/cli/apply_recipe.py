"""Apply a MedSAMix recipe to the pool's checkpoint files and write the merged checkpoint.

    medsamix-apply-recipe --recipe merged.yaml \
        --checkpoint sam=sam_vit_b_01ec64.pth --checkpoint medsam=medsam_vit_b.pth \
        --out merged_vit_b.pth

The output is a plain segment_anything state dict, written atomically (nothing is left behind on failure); the
last line names the preprocessing style the merged model expects (the recipe's ``preprocessing.style``); for
official architectures it loads with ``sam_model_registry["vit_b"](checkpoint=...)``, which is checked after
writing unless --no-verify.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from medsamix.merging.apply import merge_from_recipe
from medsamix.models.checkpoint import save_sam_checkpoint, sha256_file
from medsamix.errors import MedSAMixError
from medsamix.merging.merger import MergeError
from medsamix.merging.recipe import Recipe


def parse_checkpoint(text: str) -> tuple[str, str]:
    alias, sep, path = text.partition("=")
    if not sep or not alias or not path:
        raise argparse.ArgumentTypeError(f"expected ALIAS=PATH, got {text!r}")
    return alias, path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, type=Path, help="recipe YAML")
    ap.add_argument("--checkpoint", "-c", action="append", type=parse_checkpoint, default=[], metavar="ALIAS=PATH",
                    help="a pool checkpoint, once per alias in the recipe")
    ap.add_argument("--out", required=True, type=Path, help="merged checkpoint to write (.pth)")
    ap.add_argument("--force", action="store_true", help="merge even if checksums differ from the recipe")
    ap.add_argument("--no-verify", action="store_true", help="skip re-loading the output with segment_anything")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        recipe = Recipe.load(args.recipe)
        checkpoints = dict(args.checkpoint)
        if len(checkpoints) != len(args.checkpoint):
            raise MedSAMixError("an alias is given twice in --checkpoint")
        t0 = time.perf_counter()
        merger = merge_from_recipe(recipe, checkpoints, force=args.force)
        save_sam_checkpoint(merger.state_dict(), args.out)
        if not args.no_verify and recipe.arch.name in ("vit_b", "vit_l", "vit_h"):
            from segment_anything import sam_model_registry

            sam_model_registry[recipe.arch.name](checkpoint=str(args.out))
    except (MedSAMixError, MergeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({recipe.arch.name}, {len(merger.groups)} groups, "
          f"{time.perf_counter() - t0:.1f} s) sha256={sha256_file(args.out)} preprocessing={recipe.style}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
