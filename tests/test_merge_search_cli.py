"""scripts/merge_search.py end to end on a small generated datastore with the embedded tiny pool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsamix import Recipe
from medsamix.data.tasksets import ONE_STUDY_SPLIT
from medsamix.runs.publish import current
from test_merge_run import make_datastore

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "scripts" / "merge_search.py"


@pytest.fixture(scope="module")
def datastore(tmp_path_factory) -> Path:
    """3 phantom 'patients' (1 calibration, 2 test): a bright ellipsoid (label 1) and a dark box (label 2) in
    noise."""
    root = tmp_path_factory.mktemp("studies")
    (root / "labels" / "final").mkdir(parents=True)
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[0:40, 0:48, 0:12]
    for i in range(3):
        img = rng.normal(300, 40, (40, 48, 12)).astype(np.float32)
        lab = np.zeros((40, 48, 12), np.uint8)
        ell = ((zz - 15 - i) / 8) ** 2 + ((yy - 20) / 10) ** 2 < 1
        lab[ell] = 1
        lab[28:36, 30:44, 2:10] = 2
        img[lab == 1] += 400
        img[lab == 2] -= 200
        affine = np.diag([1.0, 1.0, 3.0, 1.0])
        nib.save(nib.Nifti1Image(img, affine), root / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), root / "labels" / "final" / f"case{i}.nii.gz")
    return root


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_search_writes_recipe_checkpoint_history_and_refuses_other_settings(datastore, tmp_path):
    out = tmp_path / "run"
    res = run("--studies", str(datastore), "--task", "label_1", "--trials", "10", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    recipe = Recipe.load(out / "recipe.yaml")
    assert recipe.scores["trials"] == 10
    assert set(recipe.scores["calibration_dice"]) == {"label_1"} and set(recipe.scores["test_dice"]) == {"label_1"}
    assert recipe.aliases == ["sam_tiny", "medsam_tiny", "medicosam_tiny"]
    assert (out / "merged.pth").is_file()
    assert len((out / "history.csv").read_text().splitlines()) == 11
    report = (out / "report.md").read_text()
    assert (out / "progress.png").stat().st_size > 0
    for name in ("medsamix", "sam_tiny", "medsam_tiny", "medicosam_tiny", "linear", "ties_0.5_0.5"):
        assert f" {name} |" in report  # compared on calibration and test slices
    assert "Test split" in report and "| enc.neck |" in report
    again = run("--studies", str(datastore), "--task", "label_2", "--trials", "10", "--out", str(out))
    assert again.returncode == 2 and "other settings" in again.stderr


def test_unknown_task_is_a_clear_error(datastore, tmp_path):
    res = run("--studies", str(datastore), "--task", "liver", "--trials", "5", "--out", str(tmp_path / "x"))
    assert res.returncode == 2
    assert "unknown task(s) ['liver']" in res.stderr and "label_1" in res.stderr


def test_warm_start_scores_an_earlier_recipe_and_refuses_a_mismatched_one(datastore, tmp_path):
    first = tmp_path / "first"
    base = ("--studies", str(datastore), "--task", "label_1", "--preprocessing", "sam")
    assert run(*base, "--trials", "10", "--out", str(first)).returncode == 0
    earlier = Recipe.load(first / "recipe.yaml")
    res = run(*base, "--trials", "11", "--warm-start", str(first / "recipe.yaml"), "--out", str(tmp_path / "warm"))
    assert res.returncode == 0, res.stderr[-2000:]
    warm = Recipe.load(tmp_path / "warm" / "recipe.yaml")
    # the earlier selection was scored on the same calibration slices: the new one is at least as good
    assert warm.scores["calibration_dice"]["label_1"] >= earlier.scores["calibration_dice"]["label_1"]
    rows = (tmp_path / "warm" / "history.csv").read_text().splitlines()[1:]
    assert len(rows) == 11 and f",{earlier.scores['calibration_dice']['label_1']:.4f}," in "".join(rows)
    stamp = json.loads((tmp_path / "warm" / "search_settings.json").read_text())
    assert stamp["context"]["warm_start"] == [earlier.config.fingerprint()]  # what the search was seeded with
    coarse = run(*base, "--trials", "11", "--granularity", "1", "--warm-start", str(first / "recipe.yaml"),
                 "--out", str(tmp_path / "g1"))
    assert coarse.returncode == 2 and f"--warm-start {first / 'recipe.yaml'}: merge.granularity 2" in coarse.stderr
    missing = run(*base, "--warm-start", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "m"))
    assert missing.returncode == 2 and f"{tmp_path / 'nope.yaml'}: no such recipe file" in missing.stderr
    other = tmp_path / "other.yaml"
    other.write_text((first / "recipe.yaml").read_text().replace(earlier.base.sha256, "a" * 64))
    res = run(*base, "--warm-start", str(other), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and f"--warm-start {other}: checkpoint checksums differ" in res.stderr
    assert not any((tmp_path / n).exists() for n in ("g1", "m", "o"))


def test_one_labelled_study_is_searched_on_a_slab_split(tmp_path):
    one = make_datastore(tmp_path / "one", n=2, labelled=1)
    out = tmp_path / "run"
    res = run("--studies", str(one), "--task", "label_1", "--trials", "10", "--preprocessing", "sam", "--out",
              str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"data: one: {ONE_STUDY_SPLIT} (case0): one volume (12 slices)" in res.stdout
    recipe = Recipe.load(out / "recipe.yaml")
    assert recipe.scores["split"].startswith(ONE_STUDY_SPLIT) and recipe.scores["test_dice"]
    assert recipe.style == "sam"  # --preprocessing fixes it
    assert f"Data: {ONE_STUDY_SPLIT}" in (out / "report.md").read_text()


@pytest.mark.slow  # 6 min at load 4: in the slow set
def test_robust_search_trades_clean_against_corrupted_dice(datastore, tmp_path):
    out = tmp_path / "robust"
    res = run("--studies", str(datastore), "--task", "label_1", "--trials", "10", "--robust", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    recipe = Recipe.load(out / "recipe.yaml")
    assert set(recipe.scores["calibration_dice"]) == {"label_1", "label_1@corrupted"}
    assert set(recipe.scores["test_dice"]) == {"label_1", "label_1@corrupted"}
    report = (out / "report.md").read_text()
    assert "MedSAMix-M (ParEGO)" in report and "| label_1@corrupted |" in report  # a row per model, clean and corrupted
    bad = run("--studies", str(datastore), "--task", "label_1", "--trials", "10", "--robust", "--min-budget", "3",
              "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "one objective only" in bad.stderr


@pytest.mark.slow  # the same search runs in the default suite through the train task (test_app_train_task)
def test_interactive_objective_is_searched_and_reported(datastore, tmp_path):
    out = tmp_path / "interactive"
    res = run("--studies", str(datastore), "--task", "label_1", "--trials", "10", "--objective", "interactive",
              "--rounds", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert "Objective: Dice of the interactive protocol (the box, then 2 correction clicks" in report
    settings = json.loads((out / "search_settings.json").read_text())["settings"]
    assert settings["rounds"] == 2
    bad = run("--studies", str(datastore), "--task", "label_1", "--objective", "interactive", "--rounds", "0",
              "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--rounds must be >= 1" in bad.stderr


@pytest.mark.slow  # 7 min at load 4 (two searches): in the slow set; the publish rule itself: test_publish.py
def test_publish_refuses_an_unpromoted_merge_and_publishes_a_promoted_one_as_the_app_does(datastore, tmp_path):
    out, served = tmp_path / "run", tmp_path / "model" / "merged"
    (tmp_path / "file").write_text("x")
    bad = run("--studies", str(datastore), "--task", "label_1", "--out", str(out), "--publish", str(tmp_path / "file"))
    assert bad.returncode == 2 and "--publish" in bad.stderr and "not a folder" in bad.stderr
    # a merge that must gain a whole Dice point over the best single model is not promoted: refused, nothing written
    refused = run("--studies", str(datastore), "--task", "label_1", "--trials", "10", "--min-gain", "1", "--out",
                  str(out), "--publish", str(served))
    assert refused.returncode == 3, refused.stderr[-2000:]
    assert f"not published to {served} (run label_1-t10-g2-seed0-" in refused.stderr
    assert "): not promoted: merged calibration Dice" in refused.stderr
    assert current(served) is None and not (served / "versions").exists()
    assert (out / "recipe.yaml").is_file()  # the run's own files are written all the same
    # the same search without the required gain resumes the finished run (no trial run again) and publishes it
    res = run("--studies", str(datastore), "--task", "label_1", "--trials", "10", "--out", str(out), "--publish",
              str(served))
    assert res.returncode == 0, res.stderr[-2000:]
    pub = current(served)
    assert pub is not None and f"published version {pub.version} to {served}" in res.stdout
    assert len((out / "history.csv").read_text().splitlines()) == 11
    # the app's layout: versions/<version>/{recipe.yaml,merged.pth} named by current.json, nothing temporary left
    assert sorted(p.name for p in served.iterdir()) == [".lock", "current.json", "versions"]
    assert sorted(p.name for p in (served / "versions").iterdir()) == [pub.version]
    assert (pub.recipe, pub.checkpoint) == (served / "versions" / pub.version / "recipe.yaml",
                                            served / "versions" / pub.version / "merged.pth")
    assert pub.recipe.read_text() == (out / "recipe.yaml").read_text()
    assert pub.checkpoint.read_bytes() == (out / "merged.pth").read_bytes()
    assert pub.info["variant"] == "MedSAMix-S" and pub.info["tasks"] == ["label_1"] and pub.info["trials"] == 10
    assert pub.info["run"].startswith("label_1-t10-g2-seed0-")  # the train task's run name for these settings
    assert pub.info["calibration_dice"] == Recipe.load(out / "recipe.yaml").scores["calibration_dice"]
