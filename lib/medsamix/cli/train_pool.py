"""Train the tiny model pool: a generalist base and two specialists fine-tuned from it.

    medsamix-train-pool --out sample-data/pool [--data ../shared/data] [--seed 0]

* ``sam_tiny`` (base): trained from scratch on procedurally generated shapes (the stand-in for SA-1B) with SAM's
  interactive objective: box or point prompts, one correction round. SAM-style preprocessing.
* ``medsam_tiny`` ("MedSAM-like"): fine-tuned from the base on real CT slices with box prompts only and MedSAM-style
  preprocessing (CT window 40/400, 256x256 resize, [0, 1]). CT source: the TotalSegmentator DICOM series
  (``totalseg/example_ct_dicom`` with ``example_seg_dicom.nii.gz``).
* ``medicosam_tiny`` ("MedicoSAM-like"): fine-tuned from the base on real MR slices with box and point prompts and a
  correction round, SAM-style preprocessing. MR source: the first ``--mr-patients`` hippocampus volumes (sorted by
  id); these patients are listed in the pool manifest and excluded from every later calibration/test split.

Writes fp16 plain state dicts, ``pool.yaml`` (architecture, members, preprocessing, sha256, training studies,
validation numbers) and a model card. Seeded: the same command gives the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import ndimage

from medsamix.cli import SHARED_DATA
from medsamix.models.architecture import TINY256
from medsamix.models.checkpoint import save_sam_checkpoint, sha256_file
from medsamix.demo.phantoms import shapes_image
from medsamix.data.intensity import normalize
from medsamix.models.preprocess import Preprocessor
from medsamix.data.studies import load_study
from medsamix.demo.training import PromptPolicy, Sample, box_dice, train_step


def slice_samples(image255: np.ndarray, label: np.ndarray, slices: range | list[int], min_pixels: int,
                  values: list[int] | None = None) -> list[Sample]:
    """All (slice, label value) pairs along axis 2 with at least ``min_pixels`` foreground pixels."""
    out = []
    for k in slices:
        lab = label[:, :, k]
        for v in (values or [int(x) for x in np.unique(lab) if x > 0]):
            m = lab == v
            if m.sum() >= min_pixels:
                out.append((image255[:, :, k], m))
    return out


def augment(sample: Sample, rng: np.random.Generator, rescale: tuple[float, float] | None = None) -> Sample:
    """rot90, flip and a 10% intensity gain; with ``rescale``, also resample the slice to a random fraction of its
    size (so that a specialist trained on 512 px slices also sees coarse 3 mm-like ones)."""
    img, m = sample
    if rescale is not None:
        f = rng.uniform(*rescale)
        small = ndimage.zoom(m.astype(np.float32), f, order=1) > 0.5
        if small.sum() >= 10:
            img, m = ndimage.zoom(img, f, order=1), small
    k = int(rng.integers(4))
    img, m = np.rot90(img, k), np.rot90(m, k)
    if rng.random() < 0.5:
        img, m = img[:, ::-1], m[:, ::-1]
    gain = rng.uniform(0.9, 1.1)
    return np.ascontiguousarray(np.clip(img * gain, 0, 255)), np.ascontiguousarray(m)


def run_stage(name: str, model: torch.nn.Module, pool: list[Sample], val: list[Sample], prep: Preprocessor,
              policy: PromptPolicy, steps: int, lr: float, batch: int, seed: int, log_every: int = 100,
              rescale: tuple[float, float] | None = None, frozen: tuple[str, ...] = ()) -> dict:
    """Train ``model`` in place; every stage has its own seed, so a stage can be re-run alone."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(frozen))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    before = box_dice(model, val, prep)
    model.train()
    t0 = time.time()
    running = 0.0
    for step in range(1, steps + 1):
        samples = [augment(pool[int(rng.integers(len(pool)))], rng, rescale) for _ in range(batch)]
        loss = train_step(model, samples, prep, policy, rng)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % log_every == 0:
            print(f"[{name}] step {step}/{steps} loss {running / log_every:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            running = 0.0
    after = box_dice(model, val, prep)
    print(f"[{name}] validation box Dice {before:.3f} -> {after:.3f} ({time.time() - t0:.0f} s)", flush=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": steps, "lr": lr, "batch": batch, "seconds": round(time.time() - t0),
            "val_box_dice_before": round(before, 4), "val_box_dice_after": round(after, 4),
            "frozen": list(frozen), "rescale": list(rescale) if rescale else None}


CARD = """# Model card: the tiny MedSAMix demonstration pool

Three SAM-architecture models ({arch}: {img}px input, {depth} ViT blocks of width {width}, {params:.2f} M parameters
each), stored as fp16 plain `segment_anything` state dicts. They exist so that the project runs and means something
without the real SAM / MedSAM / MedicoSAM weights, which cannot be downloaded here. They are far weaker than the
real models and are not for clinical use.

Made by `{base_command}` (base) and `{command}` (specialists), seed {seed}, {minutes:.0f} min on 2 CPU cores in
all. The specialists start from the published fp16 base checkpoint.

| alias | role | initialisation | training data | prompts / objective | preprocessing | steps x batch | validation box Dice (before -> after) |
|---|---|---|---|---|---|---|---|
{rows}

Objective (all three): SAM's interactive loss - focal (x20) + Dice on the low-resolution logits, IoU-head MSE,
best-of-3 multimask for single-point prompts; correction rounds add a point from the error region and feed the
previous logits back as the mask prompt. Box jitter 0-20 px at 1024 px scale (MedSAM). Optimiser AdamW, cosine
schedule with 5% warm-up, gradient clipping 1.0; augmentation: rot90, flips, 10% intensity gain.

Validation sets are held-out pieces of each model's own training source (procedural shapes from another seed; the
last 4 slices of the CT series; the last 5 of the {mr_n} reserved hippocampus patients).

Studies used for training, excluded from every calibration and test split (`training_studies` in pool.yaml):
- hippocampus: {hippo}
- totalseg: the DICOM CT series `example_ct_dicom` (with `example_seg_dicom.nii.gz`). Its patient is not documented;
  it is a different acquisition from `example_ct.nii.gz` (other scanner frame and resolution), which is used for
  testing, but that they are different patients cannot be verified.

Held-out results on real data (test splits, tight boxes) are in `results/baseline.md`: each specialist beats the
base on some tasks and loses on others.

Data licences: MSD hippocampus (CC-BY-SA 4.0), TotalSegmentator test files (Apache-2.0).
"""

ROLES = {
    "sam_tiny": ("generalist base (SAM-like)", "random", "procedural shapes and textures", "box or point, 1 correction"),
    "medsam_tiny": ("CT specialist (MedSAM-like)", "sam_tiny", "real CT slices, 32 TotalSegmentator organs",
                    "box only"),
    "medicosam_tiny": ("MR specialist (MedicoSAM-like)", "sam_tiny", "real T1 MR slices, hippocampus (2 labels)",
                       "box or point, 1 correction"),
}


def write_card(folder: Path) -> None:
    m = yaml.safe_load((folder / "pool.yaml").read_text())
    spec = TINY256
    rows = []
    for member in [m["base"], *m["models"]]:
        role, init, data, prompts = ROLES[member["alias"]]
        t = member["training"]
        rows.append(f"| {member['alias']} | {role} | {init} | {data} | {prompts} | {member['preprocessing']['style']} "
                    f"| {t['steps']} x {t['batch']} | {t['val_box_dice_before']:.3f} -> {t['val_box_dice_after']:.3f} |")
    params = sum(p.numel() for p in spec.build().parameters()) / 1e6
    hippo = m["training_studies"]["hippocampus"]
    (folder / "MODEL_CARD.md").write_text(CARD.format(
        arch=spec.name, img=spec.img_size, depth=spec.encoder_depth, width=spec.encoder_embed_dim, params=params,
        command=m["command"], base_command=m.get("base_command", m["command"]), seed=m["seed"], minutes=m["total_seconds"] / 60, rows="\n".join(rows),
        mr_n=len(hippo), hippo=", ".join(hippo)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("sample-data/pool"))
    ap.add_argument("--data", type=Path, default=SHARED_DATA)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-steps", type=int, default=2500)
    ap.add_argument("--specialist-steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bank", type=int, default=1500, help="procedural images pre-generated for the base")
    ap.add_argument("--mr-patients", type=int, default=40)
    ap.add_argument("--card-only", action="store_true", help="only (re)write MODEL_CARD.md from pool.yaml")
    ap.add_argument("--specialists-only", action="store_true",
                    help="keep the base in --out (sam_tiny.pth, pool.yaml) and retrain the specialists from it")
    args = ap.parse_args(argv)
    if args.card_only:
        write_card(args.out)
        return 0
    if not args.data.is_dir():
        print(f"error: {args.data}: real-image data folder not found (the specialists need real CT and MR)",
              file=sys.stderr)
        return 1
    t_all = time.time()
    spec = TINY256
    model = spec.build()
    sam_prep = Preprocessor("sam", spec.img_size)
    medsam_prep = Preprocessor("medsam", spec.img_size)
    base_path = args.out / "sam_tiny.pth"
    if args.specialists_only:
        old = yaml.safe_load((args.out / "pool.yaml").read_text())
        stats = {"sam_tiny": old["base"]["training"]}
        base_seconds = stats["sam_tiny"]["seconds"]
    else:
        # --- base on procedural shapes
        bank_rng = np.random.default_rng(args.seed + 1)
        bank = []
        for _ in range(args.bank):
            img, masks = shapes_image(bank_rng, spec.img_size)
            bank.extend((img, m) for m in masks)
        val_rng = np.random.default_rng(args.seed + 2)
        shapes_val = [(img, masks[0]) for img, masks in (shapes_image(val_rng, spec.img_size) for _ in range(40))]
        print(f"procedural bank: {len(bank)} objects on {args.bank} images", flush=True)
        stats = {"sam_tiny": run_stage("sam_tiny", model, bank, shapes_val, sam_prep, PromptPolicy(0.5, 0.5, 1),
                                       args.base_steps, 4e-4, args.batch, args.seed)}
        base_seconds = 0
        args.out.mkdir(parents=True, exist_ok=True)
        save_sam_checkpoint({k: v.half() for k, v in model.state_dict().items()}, base_path)
    # The specialists start from the published (fp16) base, as MedSAM started from the released SAM checkpoint.
    base_state = {k: v.float() for k, v in torch.load(base_path, weights_only=True).items()}

    # --- CT specialist (MedSAM-like): box prompts only, MedSAM preprocessing
    ct_study = load_study(args.data / "totalseg" / "example_ct_dicom",
                          args.data / "totalseg" / "example_seg_dicom.nii.gz", modality="CT")
    ct, ct_label = ct_study.image, ct_study.label
    ct255 = normalize(ct, "CT")
    k = ct.shape[2]
    ct_train = slice_samples(ct255, ct_label, range(0, k - 4), min_pixels=50)
    ct_val = slice_samples(ct255, ct_label, range(k - 4, k), min_pixels=50)
    print(f"CT specialist data: {len(ct_train)} train / {len(ct_val)} val (slice, organ) pairs", flush=True)
    model.load_state_dict(base_state)
    stats["medsam_tiny"] = run_stage("medsam_tiny", model, ct_train, ct_val, medsam_prep,
                                     PromptPolicy(1.0, 0.0, 0), args.specialist_steps, 5e-5, args.batch,
                                     args.seed + 10, rescale=(0.2, 1.0), frozen=("prompt_encoder.",))
    stats["medsam_tiny"]["base_on_same_val"] = stats["medsam_tiny"]["val_box_dice_before"]
    medsam_state = {k: v.clone() for k, v in model.state_dict().items()}

    # --- MR specialist (MedicoSAM-like): box + point prompts with a correction round, SAM preprocessing
    hippo = args.data / "hippocampus"
    ids = sorted(p.name for p in (hippo / "images").glob("*.nii.gz"))[: args.mr_patients]
    mr_train, mr_val = [], []
    for i, name in enumerate(ids):
        study = load_study(hippo / "images" / name, hippo / "labels" / name, modality="MR")
        vol = study.image
        samples = slice_samples(normalize(vol, "MR"), study.label, range(vol.shape[2]),
                                min_pixels=10)
        (mr_val if i >= args.mr_patients - 5 else mr_train).extend(samples)
    print(f"MR specialist data: {len(mr_train)} train / {len(mr_val)} val (slice, structure) pairs", flush=True)
    model.load_state_dict(base_state)
    stats["medicosam_tiny"] = run_stage("medicosam_tiny", model, mr_train, mr_val, sam_prep,
                                        PromptPolicy(0.5, 0.5, 1), args.specialist_steps, 1e-4, args.batch,
                                        args.seed + 20)
    medicosam_state = {k: v.clone() for k, v in model.state_dict().items()}

    args.out.mkdir(parents=True, exist_ok=True)
    members = []
    for alias, state, style in (("sam_tiny", None, "sam"), ("medsam_tiny", medsam_state, "medsam"),
                                ("medicosam_tiny", medicosam_state, "sam")):
        path = args.out / f"{alias}.pth"
        if state is not None:
            save_sam_checkpoint({k: v.half() for k, v in state.items()}, path)
        members.append({"alias": alias, "file": path.name, "sha256": sha256_file(path),
                        "preprocessing": {"style": style}, "training": stats[alias]})
    manifest = {
        "architecture": spec.to_dict(),
        "base": members[0],
        "models": members[1:],
        "training_studies": {"hippocampus": [n.removesuffix(".nii.gz") for n in ids],
                             "totalseg": ["example_ct_dicom"]},
        "command": " ".join(sys.argv),
        "base_command": (old.get("base_command", old["command"]) if args.specialists_only else " ".join(sys.argv)),
        "seed": args.seed,
        "total_seconds": round(time.time() - t_all + base_seconds),
    }
    (args.out / "pool.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False, width=120))
    write_card(args.out)
    print(f"wrote {args.out} in {time.time() - t_all:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
