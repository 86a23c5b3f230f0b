"""Recipes and the apply_recipe command-line tool."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY
from medsamix import MergeConfig, Merger, ModelPool, ModelRef, Recipe, sha256_file
from medsamix.merging.apply import merge_from_recipe
from medsamix.models.architecture import VIT_B, reference_param_names
from medsamix.models.checkpoint import load_sam_checkpoint
from medsamix.errors import ConfigError
from medsamix.merging.groups import group_parameters

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "scripts" / "apply_recipe.py"


def make_recipe(files: dict[str, Path], arch=TINY, granularity: int = 2, seed: int = 0) -> Recipe:
    aliases = list(files)
    groups = group_parameters(reference_param_names(arch), granularity)
    cfg = MergeConfig.random(groups, aliases, random.Random(seed), granularity=granularity)
    return Recipe(arch=arch, base=ModelRef(aliases[0], sha256_file(files[aliases[0]])),
                  models=[ModelRef(a, sha256_file(files[a])) for a in aliases[1:]], merge=cfg,
                  preprocessing={"style": "medsam"}, scores={"calibration_dice": {"hippocampus": 0.5}})


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, timeout=600)


def checkpoint_args(files: dict[str, Path]) -> list[str]:
    return [x for a, p in files.items() for x in ("--checkpoint", f"{a}={p}")]


def test_round_trip(tiny_pool_files, tmp_path):
    recipe = make_recipe(tiny_pool_files)
    recipe.save(tmp_path / "r.yaml")
    loaded = Recipe.load(tmp_path / "r.yaml")
    assert loaded.to_dict() == recipe.to_dict()
    text = (tmp_path / "r.yaml").read_text()
    assert str(tmp_path) not in text  # no file paths in recipes
    assert yaml.safe_load(text)["architecture"]["encoder_depth"] == 4


def test_merge_from_recipe_reproduces_merger(tiny_pool_files):
    recipe = make_recipe(tiny_pool_files)
    merged = merge_from_recipe(recipe, tiny_pool_files).state_dict()
    pool = ModelPool.load(("sam", tiny_pool_files["sam"]), {a: tiny_pool_files[a] for a in ("medsam", "medicosam")},
                          arch=TINY)
    direct = Merger(pool, granularity=2).apply(recipe.merge).state_dict()
    for k in direct:
        assert torch.equal(merged[k], direct[k]), k


def test_recipe_keeps_a_searched_configurations_style_in_its_preprocessing_section(tiny_pool_files, tmp_path):
    """A search's configuration carries its preprocessing style; the recipe records it once, in
    ``preprocessing.style``, and gives it back with the configuration and as the served input convention."""
    searched = make_recipe(tiny_pool_files).merge.with_preprocessing("medsam")
    base = make_recipe(tiny_pool_files)
    recipe = Recipe(arch=base.arch, base=base.base, models=base.models, merge=searched,
                    preprocessing={"style": "medsam"})
    assert recipe.merge.preprocessing is None and recipe.style == "medsam" and recipe.config == searched
    d = recipe.to_dict()
    assert d["preprocessing"] == {"style": "medsam"} and "preprocessing" not in d["merge"]
    recipe.save(tmp_path / "r.yaml")
    loaded = Recipe.load(tmp_path / "r.yaml")
    assert loaded.config == searched and loaded.config.fingerprint() == searched.fingerprint()
    prep = loaded.preprocessor()
    assert (prep.style, prep.img_size) == ("medsam", TINY.img_size)
    with pytest.raises(ConfigError, match="differs from preprocessing.style 'sam'"):
        Recipe(arch=base.arch, base=base.base, models=base.models, merge=searched, preprocessing={"style": "sam"})
    res = run_cli("--recipe", str(tmp_path / "r.yaml"), *checkpoint_args(tiny_pool_files), "--out",
                  str(tmp_path / "m.pth"))
    assert res.returncode == 0 and "preprocessing=medsam" in res.stdout, res.stderr


def test_cli_writes_a_loadable_checkpoint(tiny_pool_files, tmp_path):
    recipe = make_recipe(tiny_pool_files)
    recipe.save(tmp_path / "r.yaml")
    out = tmp_path / "out" / "merged.pth"
    res = run_cli("--recipe", str(tmp_path / "r.yaml"), *checkpoint_args(tiny_pool_files), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "sha256=" in res.stdout
    sd, report = load_sam_checkpoint(out, TINY)
    assert report.layout == "plain" and report.prefix == "" and not report.ignored
    expected = merge_from_recipe(recipe, tiny_pool_files).state_dict()
    for k in expected:
        assert torch.equal(sd[k], expected[k]), k
    assert [p.name for p in out.parent.iterdir()] == ["merged.pth"]  # no temporary files left


def test_cli_refuses_checksum_mismatch_unless_forced(tiny_pool_files, tmp_path):
    recipe = make_recipe(tiny_pool_files)
    recipe.save(tmp_path / "r.yaml")
    swapped = dict(tiny_pool_files, medsam=tiny_pool_files["medicosam"], medicosam=tiny_pool_files["medsam"])
    out = tmp_path / "merged.pth"
    res = run_cli("--recipe", str(tmp_path / "r.yaml"), *checkpoint_args(swapped), "--out", str(out))
    assert res.returncode == 2
    assert "checksums differ" in res.stderr and "medsam:" in res.stderr
    assert not out.exists()
    res = run_cli("--recipe", str(tmp_path / "r.yaml"), *checkpoint_args(swapped), "--out", str(out), "--force")
    assert res.returncode == 0, res.stderr
    assert out.exists()


def test_cli_bad_checkpoint_names_the_file(tiny_pool_files, tmp_path):
    recipe = make_recipe(tiny_pool_files)
    recipe.save(tmp_path / "r.yaml")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(tiny_pool_files["medsam"].read_bytes()[:5000])
    files = dict(tiny_pool_files, medsam=broken)
    out = tmp_path / "merged.pth"
    res = run_cli("--recipe", str(tmp_path / "r.yaml"), *checkpoint_args(files), "--out", str(out), "--force")
    assert res.returncode == 2
    assert str(broken) in res.stderr
    assert not out.exists()


def test_cli_missing_alias(tiny_pool_files, tmp_path):
    make_recipe(tiny_pool_files).save(tmp_path / "r.yaml")
    files = {a: p for a, p in tiny_pool_files.items() if a != "medicosam"}
    res = run_cli("--recipe", str(tmp_path / "r.yaml"), *checkpoint_args(files), "--out", str(tmp_path / "m.pth"))
    assert res.returncode == 2 and "missing ['medicosam']" in res.stderr


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["merge"]["groups"].__setitem__("enc.blocks.9-10", {"method": "pick", "params": {"source": "sam"}}),
     r"merge.groups: unknown group\(s\) \['enc.blocks.9-10'\]"),
    (lambda d: d["merge"]["groups"]["enc.neck"].__setitem__("method", "magic"),
     r"groups.enc.neck.method: unknown merge method 'magic'"),
    (lambda d: d["merge"]["groups"].__setitem__("dec.iou_head", {"method": "ties", "params": {"keep": -0.1}}),
     r"groups.dec.iou_head: ties.keep: -0.1 is outside"),
    (lambda d: d["merge"]["groups"].__setitem__("dec.iou_head", {"method": "pick", "params": {"source": "x.pth"}}),
     r"unknown source 'x.pth'"),
    (lambda d: d["merge"].__setitem__("granularity", 7), r"granularity: must be one of"),
    (lambda d: d["base"].__setitem__("sha256", "abc"), r"base.sha256: not a hex sha256"),
    (lambda d: d.pop("models"), r"models: expected a list"),
    (lambda d: d.__setitem__("preprocessing", {"style": "ct"}), r"preprocessing.style: must be one of"),
    (lambda d: d["merge"].__setitem__("preprocessing", "medsam"), r"merge.preprocessing: the style belongs in"),
    (lambda d: d.__setitem__("architecture", "vit_q"), r"architecture: unknown architecture 'vit_q'"),
    (lambda d: d.__setitem__("medsamix_recipe", 9), r"format version"),
])
def test_recipe_errors_name_file_and_field(tiny_pool_files, tmp_path, edit, match):
    d = make_recipe(tiny_pool_files).to_dict()
    edit(d)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=match) as exc:
        Recipe.load(path)
    assert str(path) in str(exc.value)
    out = tmp_path / "m.pth"
    res = run_cli("--recipe", str(path), *checkpoint_args(tiny_pool_files), "--out", str(out))
    assert res.returncode == 2 and str(path) in res.stderr and not out.exists()


def test_invalid_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("merge: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Recipe.load(path)


def test_vit_b_cli_output_loads_strictly_with_segment_anything(tmp_path):
    """The real-architecture path: random ViT-B checkpoints in two published layouts, merged by the CLI, and the
    result loaded with ``sam_model_registry['vit_b'](checkpoint=...)``."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    base = sam_model_registry["vit_b"]().state_dict()
    files = {"sam": tmp_path / "sam_vit_b.pth", "medsam": tmp_path / "medsam_train.pth"}
    torch.save(base, files["sam"])
    g = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    torch.save({"model": tuned, "epoch": 10}, files["medsam"])
    del tuned
    recipe = make_recipe(files, arch=VIT_B, granularity=3, seed=5)
    recipe.save(tmp_path / "r.yaml")
    out = tmp_path / "merged_vit_b.pth"
    res = run_cli("--recipe", str(tmp_path / "r.yaml"), *checkpoint_args(files), "--out", str(out))
    assert res.returncode == 0, res.stderr
    model = sam_model_registry["vit_b"](checkpoint=str(out))  # strict load inside segment_anything
    sd = model.state_dict()
    expected = merge_from_recipe(recipe, files).state_dict()
    assert set(sd) == set(expected)
    for k in expected:
        assert torch.equal(sd[k], expected[k]), k
