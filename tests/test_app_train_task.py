"""The app's "merge" train task in-process, on a MONAI Label LocalDatastore and a tiny random pool given as files.

(The same task through the real server, with stop and resume, is in test_app_train.py.)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from conftest import TINY, random_state
from medsamix import Recipe
from medsamix.runs.publish import current
from medsamix.data.tasksets import ONE_STUDY_SPLIT
from test_merge_run import make_datastore

APP = Path(__file__).resolve().parents[1] / "apps" / "medsamix"


def _merge_module() -> ModuleType:
    """apps/medsamix/lib/trainers/merge.py, loaded by path (the app's ``lib`` package is not on sys.path here)."""
    spec = importlib.util.spec_from_file_location("medsamix_app_merge", APP / "lib" / "trainers" / "merge.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


merge = _merge_module()


@pytest.fixture(scope="module")
def models_spec(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("pool")
    out = []
    for i, alias in enumerate(["sam", "medsam", "medicosam"]):
        torch.save(random_state(TINY, i), d / f"{alias}.pth")
        out.append(f"{alias}={d / f'{alias}.pth'}")
    return ",".join(out)


def _datastore(root: Path, labelled: int):
    from monailabel.datastore.local import LocalDatastore

    make_datastore(root, n=5, labelled=labelled)
    return LocalDatastore(str(root), extensions=("*.nii.gz",), auto_reload=False)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    return root, _datastore(root, labelled=4)


def _task(studies_root: Path, model_dir: Path, models_spec: str, **conf: str):
    conf = {"models": models_spec, "model_dir": str(model_dir), "labels": "ellipsoid", "merge_report": "false",
            **conf}
    return merge.MergeTrain(str(APP), str(studies_root), "", str(model_dir / "merged"), conf)


def test_config_lists_the_options_clients_show():
    t = merge.MergeTrain(str(APP), "/nowhere", "", "/nowhere/model/merged", {})
    assert set(t.config()) == {"task", "trials", "granularity", "separate", "min_budget", "seed", "restart",
                               "preprocessing", "min_gain", "robust", "objective", "rounds"}
    # before any run: an idle entry that OHIF's panel shows as 0 of the default trials (not "100 %")
    assert t.stats() == {"status": "idle", "epoch": 0, "total_epochs": 30, "best_metric": 0.0,
                         "total_time": "0:00:00", "message": "no merge run yet"}
    assert t.runs_dir == Path("/nowhere/model/runs")


def test_train_publishes_reports_progress_and_a_second_request_resumes(studies, models_spec, tmp_path):
    root, ds = studies
    task = _task(root, tmp_path / "model", models_spec, merge_report="true")
    res = task({"model": "merge", "task": "ellipsoid", "trials": "10"}, ds)
    assert res["report"] and Path(res["report"]).is_file()
    assert res["variant"] == "MedSAMix-S" and res["trials"] == 10 and res["promoted"] is True
    pub = current(tmp_path / "model" / "merged")
    assert pub is not None and pub.version == res["published_version"]
    assert pub.info["run"] == res["run"] and pub.info["calibration_dice"] == res["calibration_dice"]
    assert pub.load_recipe().scores["calibration_dice"] == res["calibration_dice"]
    # published before the report (which scores every reference model on the test slices) was written
    assert (tmp_path / "model" / "merged" / "current.json").stat().st_mtime <= Path(res["report"]).stat().st_mtime
    st = task.stats()
    assert st["status"] == "done" and st["epoch"] == 10 and st["total_epochs"] == 10 and st["total_time"]
    assert st["best_metric"] == pytest.approx(res["calibration_dice"]["ellipsoid"])
    assert st["published_version"] == pub.version and st["message"].startswith("promoted:")
    assert st["notes"] == ["1 study without a final label not used"]
    run_dir = Path(res["out_dir"])
    assert run_dir.parent == tmp_path / "model" / "runs"
    assert len((run_dir / "trials.jsonl").read_text().splitlines()) == 10
    # the same request again: nothing to evaluate, nothing published twice
    task = _task(root, tmp_path / "model", models_spec)
    again = task({"model": "merge", "task": "ellipsoid", "trials": 10}, ds)
    assert again["run"] == res["run"] and again["published_version"] == pub.version
    assert task.stats()["resumed_trials"] == 10
    assert len(list((tmp_path / "model" / "merged" / "versions").iterdir())) == 1
    # restart discards the stored trials; a damaged pointer of the served folder is replaced by the new version
    (tmp_path / "model" / "merged" / "current.json").write_text("{cut")
    fresh = task({"model": "merge", "task": "ellipsoid", "trials": 10, "restart": True}, ds)
    assert task.stats()["resumed_trials"] == 0
    now = current(tmp_path / "model" / "merged")
    assert now is not None and now.version == fresh["published_version"] != pub.version


def test_several_tasks_run_medsamix_m_and_a_required_gain_blocks_promotion(studies, models_spec, tmp_path):
    root, ds = studies
    task = _task(root, tmp_path / "model", models_spec)
    res = task({"model": "merge", "task": "", "trials": 10, "min_gain": 0.5}, ds)
    assert res["variant"] == "MedSAMix-M" and res["tasks"] == ["ellipsoid", "label_2"]
    assert res["promoted"] is False and res["published_version"] is None
    assert res["promotion"]["reason"].startswith("not promoted") and "required gain 0.5" in res["promotion"]["reason"]
    assert current(tmp_path / "model" / "merged") is None
    st = task.stats()
    assert st["status"] == "done" and not st["promoted"] and "served model is unchanged" in st["message"]


def test_multi_fidelity_counts_every_trial_and_reports_full_budget_dice(studies, models_spec, tmp_path):
    root, ds = studies
    task = _task(root, tmp_path / "model", models_spec)
    res = task({"model": "merge", "task": "ellipsoid", "trials": 10, "min_budget": 3}, ds)
    assert "-mb3-" in res["run"] and res["trials"] == 10 and res["extra_full_budget_scores"] >= 0
    st = task.stats()
    assert st["epoch"] == 10 and st["status"] == "done"
    assert st["best_metric"] == pytest.approx(res["calibration_dice"]["ellipsoid"])
    budgets = [json.loads(line)["budget"] for line in (Path(res["out_dir"]) / "trials.jsonl").read_text().splitlines()]
    assert len(budgets) == 10 and any(b is not None for b in budgets)


def test_one_labelled_study_runs_on_a_slab_split_stated_in_the_status(models_spec, tmp_path):
    ds = _datastore(tmp_path / "studies", labelled=1)
    task = _task(tmp_path / "studies", tmp_path / "model", models_spec)
    res = task({"model": "merge", "task": "ellipsoid", "trials": 10, "preprocessing": "medsam"}, ds)
    assert res["split"].startswith(f"{ONE_STUDY_SPLIT} (case0): one volume (12 slices)")
    assert res["preprocessing"] == "medsam" and "-prep_medsam-" in res["run"]
    st = task.stats()
    assert st["status"] == "done" and st["split"] == res["split"] and ONE_STUDY_SPLIT in st["message"]
    assert st["calibration_slices"] == 3 and st["test_slices"] > 0
    assert st["notes"] == ["4 studies without a final label not used"]
    recipe = Recipe.load(Path(res["out_dir"]) / "recipe.yaml")
    assert recipe.scores["split"] == res["split"] and recipe.style == "medsam"


def test_the_interactive_objective_scores_correction_rounds(studies, models_spec, tmp_path):
    root, ds = studies
    task = _task(root, tmp_path / "model", models_spec)
    box = task({"model": "merge", "task": "ellipsoid", "trials": 10}, ds)
    res = task({"model": "merge", "task": "ellipsoid", "trials": "10", "objective": "interactive", "rounds": "2"}, ds)
    assert res["run"] != box["run"] and task.stats()["status"] == "done"  # another search: another run folder
    stamp = json.loads((Path(res["out_dir"]) / "search_settings.json").read_text())
    assert stamp["settings"]["rounds"] == 2 and "rounds" not in json.loads(
        (Path(box["out_dir"]) / "search_settings.json").read_text())["settings"]
    # the selected merge scored with the box and 2 correction clicks differs from its box-only Dice
    assert res["calibration_dice"]["ellipsoid"] != pytest.approx(box["calibration_dice"]["ellipsoid"], abs=1e-9)


@pytest.mark.parametrize("labelled, request_, needle", [
    (4, {"objective": "clicks"}, "objective: must be one of ['box', 'interactive']"),
    (4, {"objective": "interactive", "rounds": 0}, "rounds: must lie in [1, 20]"),
    (4, {"objective": "interactive", "rounds": "three"}, "rounds: expected an integer"),
    (4, {"task": "liver"}, "unknown task(s) ['liver']; this data has ['ellipsoid', 'label_2']"),
    (4, {"trials": 3}, "trials must be at least 10"),
    (4, {"granularity": 7}, "granularity: must be one of [1, 2, 3, 4]"),
    (4, {"task": "ellipsoid,label_2", "min_budget": 3}, "one task only"),
    (0, {}, "no labelled studies: none of the 5 images in the datastore has a final label"),
])
def test_bad_requests_fail_with_the_reason_in_stats(labelled, request_, needle, models_spec, tmp_path):
    from fastapi import HTTPException

    ds = _datastore(tmp_path / "studies", labelled)
    task = _task(tmp_path / "studies", tmp_path / "model", models_spec)
    with pytest.raises(HTTPException) as e:
        task({"model": "merge", "trials": 10, **request_}, ds)
    assert e.value.status_code == 400 and needle in e.value.detail
    st = task.stats()
    assert st["status"] == "failed" and needle in st["message"]
    assert current(tmp_path / "model" / "merged") is None
    json.dumps(st)


def test_a_request_while_another_task_or_process_holds_the_run_is_refused(studies, models_spec, tmp_path):
    from fastapi import HTTPException

    from medsamix.runs.lock import RunLock

    root, ds = studies
    task = _task(root, tmp_path / "model", models_spec)
    res = task({"model": "merge", "task": "ellipsoid", "trials": 10}, ds)
    run_dir = Path(res["out_dir"])
    before = task.stats()
    # another merge train task of the app still runs (started before a server restart): 409, its status untouched
    with RunLock(tmp_path / "model" / "runs"):
        with pytest.raises(HTTPException) as e:
            task({"model": "merge", "task": "ellipsoid", "trials": 10, "restart": True}, ds)
    assert e.value.status_code == 409 and "model/runs is in use" in e.value.detail
    assert task.stats() == before
    # another process (scripts/merge_search.py) runs in the run folder: restart does not discard it
    with RunLock(run_dir):
        with pytest.raises(HTTPException) as e:
            task({"model": "merge", "task": "ellipsoid", "trials": 10, "restart": True}, ds)
    assert e.value.status_code == 400 and f"{run_dir} is in use" in e.value.detail
    assert len((run_dir / "trials.jsonl").read_text().splitlines()) == 10 and (run_dir / "recipe.yaml").is_file()
    assert task.stats()["status"] == "failed" and "is in use" in task.stats()["message"]
