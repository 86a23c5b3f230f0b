"""medsamix.runs.run: task sets from (image, label) pairs, options, run names, progress, promotion, resume."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import TINY, random_state
from medsamix.data.tasksets import ONE_STUDY_SPLIT, select_tasks, task_set_from_pairs
from medsamix.errors import MergeRunError
from medsamix.runs.lock import process_started
from medsamix.runs.options import MergeOptions, label_names, parse_tasks
from medsamix.runs.plan import plan_run, run_name
from medsamix.runs.progress import ProgressFile, RunMonitor, effective_status
from medsamix.runs.promotion import decide_promotion
from medsamix.runs.run import run_merge
from medsamix.models.pool import ModelPool
from medsamix.search.search import SearchSettings, Trial


STYLES = {"sam": "sam", "medsam": "medsam", "medicosam": "sam"}  # own preprocessing of the pool models below


def make_datastore(root: Path, n: int = 5, labelled: int | None = None, shape: tuple[int, int, int] = (40, 48, 12)
                   ) -> Path:
    """``n`` phantom 'patients' (bright ellipsoid = 1, dark box = 2 in noise); the first ``labelled`` get labels."""
    (root / "labels" / "final").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    zz, yy, _ = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    for i in range(n):
        img = rng.normal(300, 40, shape).astype(np.float32)
        lab = np.zeros(shape, np.uint8)
        lab[((zz - 15 - i) / 8) ** 2 + ((yy - 20) / 10) ** 2 < 1] = 1
        lab[28:36, 30:44, 2:10] = 2
        img[lab == 1] += 400
        img[lab == 2] -= 200
        affine = np.diag([1.0, 1.0, 3.0, 1.0])
        nib.save(nib.Nifti1Image(img, affine), root / f"case{i}.nii.gz")
        if labelled is None or i < labelled:
            nib.save(nib.Nifti1Image(lab, affine), root / "labels" / "final" / f"case{i}.nii.gz")
    return root


def pairs_of(root: Path) -> list[tuple[Path, Path | None]]:
    out = []
    for img in sorted(root.glob("*.nii.gz")):
        lab = root / "labels" / "final" / img.name
        out.append((img, lab if lab.exists() else None))
    return out


@pytest.fixture(scope="module")
def datastore(tmp_path_factory) -> Path:
    return make_datastore(tmp_path_factory.mktemp("studies"), n=5, labelled=4)


@pytest.fixture(scope="module")
def task_set(datastore):
    return task_set_from_pairs("studies", pairs_of(datastore), {1: "ellipsoid"}, seed=0)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> ModelPool:
    d = tmp_path_factory.mktemp("pool")
    files = {}
    for i, alias in enumerate(["sam", "medsam", "medicosam"]):
        files[alias] = d / f"{alias}.pth"
        torch.save(random_state(TINY, i), files[alias])
    return ModelPool.load(("sam", files["sam"]), [("medsam", files["medsam"]), ("medicosam", files["medicosam"])],
                          arch=TINY, styles=STYLES)


# ------------------------------------------------------------------------------------------------ options


def test_options_accept_strings_and_fill_defaults():
    o = MergeOptions.from_mapping({"task": "ellipsoid, label_2", "trials": "12", "granularity": "3",
                                   "min_budget": "0", "seed": 2.0, "restart": "true", "model": "merge",
                                   "preprocessing": ""}, {"trials": 30})
    assert o == MergeOptions(("ellipsoid", "label_2"), 12, 3, False, None, 2, True, None, 0.0)
    assert MergeOptions.from_mapping({}, {"trials": 30, "task": ""}).trials == 30
    assert MergeOptions.from_mapping({"labels": ["a", "b", "a"]}).tasks == ("a", "b")
    assert MergeOptions.from_mapping({"min_budget": 4, "min_gain": "0.01"}).min_budget == 4
    assert MergeOptions.from_mapping({"robust": "true"}).robust and not MergeOptions.from_mapping({}).robust
    inter = MergeOptions.from_mapping({"objective": "Interactive", "rounds": "2"})
    assert (inter.objective, inter.rounds, inter.settings(("a",), STYLES).rounds) == ("interactive", 2, 2)
    box = MergeOptions.from_mapping({"objective": "", "rounds": 5})  # rounds only count for the interactive objective
    assert box.objective == "box" and box.settings(("a",), STYLES).rounds == 0
    s = MergeOptions.from_mapping({"preprocessing": "medsam"}).settings(("a",), STYLES)
    assert s.preprocessing == "medsam" and s.own_styles == tuple(STYLES.items())  # fixed: no search over it
    searched = MergeOptions.from_mapping({"preprocessing": ""}).settings(("a",), STYLES)
    assert searched.preprocessing is None and searched.searched_styles == ("sam", "medsam")


@pytest.mark.parametrize("values, needle", [
    ({"trials": "many"}, "trials: expected an integer"),
    ({"trials": 0}, "trials: must be >= 1"),
    ({"trials": 2.5}, "trials: expected an integer"),
    ({"granularity": 5}, "granularity: must be one of \\[1, 2, 3, 4\\]"),
    ({"min_budget": -1}, "min_budget: must be >= 0"),
    ({"seed": -3}, "seed: must be >= 0"),
    ({"restart": "maybe"}, "restart: expected true or false"),
    ({"preprocessing": "ct"}, "preprocessing: must be one of"),
    ({"min_gain": "x"}, "min_gain: expected a number"),
    ({"robust": "sometimes"}, "robust: expected true or false"),
    ({"objective": "points"}, "objective: must be one of"),
    ({"rounds": 0}, "rounds: must lie in"),
    ({"rounds": 21}, "rounds: must lie in"),
    ({"rounds": True}, "rounds: expected an integer"),
])
def test_bad_options_name_the_option(values, needle):
    with pytest.raises(MergeRunError, match=needle):
        MergeOptions.from_mapping(values)


@pytest.mark.parametrize("field, value", [("objective", "x" * 5000), ("preprocessing", "y" * 5000),
                                          ("objective", ["box"] * 1000)])
def test_a_rejected_value_is_echoed_shortened(field, value):
    """A hostile request field of any length is named and cut in the error, not repeated whole."""
    with pytest.raises(MergeRunError) as err:
        MergeOptions.from_mapping({field: value})
    message = str(err.value)
    assert message.startswith(f"{field}: must be one of") and message.endswith("...") and len(message) < 200


def test_parse_tasks_and_label_names():
    assert parse_tasks(None) == () and parse_tasks("") == () and parse_tasks(" , ") == ()
    assert parse_tasks("left kidney,, liver ,left kidney") == ("left kidney", "liver")
    assert label_names('{"liver": 1, "spleen": 3}') == {1: "liver", 3: "spleen"}
    assert label_names({"1": "liver"}) == {1: "liver"}
    assert label_names("liver,spleen") == {1: "liver", 2: "spleen"}
    assert label_names(["x"]) == {1: "x"} and label_names(None) == {} and label_names("") == {}
    with pytest.raises(MergeRunError, match="labels"):
        label_names({"liver": [1]})


# ------------------------------------------------------------------------------------------------ task sets


def test_task_set_skips_unlabelled_studies_and_splits_by_patient(task_set):
    ts, skipped = task_set
    assert [s.path.name for s in skipped] == ["case4.nii.gz"] and "no label" in skipped[0].reason
    assert [t.name for t in ts.tasks] == ["ellipsoid", "label_2"]
    assert ts.split == "patients: 1 calibration / 3 test"
    assert not {s.study_id for s in ts.calibration} & {s.study_id for s in ts.test}


def test_one_labelled_study_is_split_by_slabs_and_none_is_a_clear_error(tmp_path):
    root = make_datastore(tmp_path / "one", n=3, labelled=1, shape=(40, 48, 50))
    ts, skipped = task_set_from_pairs("one", pairs_of(root), {1: "ellipsoid"})
    assert len(skipped) == 2 and ts.split.startswith(f"{ONE_STUDY_SPLIT} (case0): one volume (50 slices")
    assert "contiguous slab" in ts.split and "guard" in ts.split
    assert {s.study_id for s in ts.calibration} == {s.study_id for s in ts.test} == {"case0"}
    for task in ("ellipsoid", "label_2"):  # label_2 lies on 8 of the 50 slices: the slabs still reach it
        cal = {s.index for s in ts.calibration if s.task.name == task}
        test = {s.index for s in ts.test if s.task.name == task}
        assert len(cal) >= 3 and test and not cal & test
        assert all(abs(c - t) > 1 for c in cal for t in test)  # a guard slice between calibration and test
    cal_slices = sorted({s.index for s in ts.calibration})
    assert len(cal_slices) == 10 and cal_slices[-1] - cal_slices[0] > 10  # 20%, in 2 slabs spread over the volume
    assert select_tasks(ts, ["ellipsoid", "label_2"])[1]
    # a thin volume (12 slices): still at least 3 calibration slices
    thin, _ = task_set_from_pairs("thin", pairs_of(make_datastore(tmp_path / "thin", n=1, labelled=1)))
    assert select_tasks(thin, ["label_1"])[0] and len({s.index for s in thin.calibration}) == 3
    with pytest.raises(MergeRunError, match=r"at least 1 labelled study is needed, found 0.*no label"):
        task_set_from_pairs("unlabelled", pairs_of(make_datastore(tmp_path / "none", n=2, labelled=0)))
    with pytest.raises(MergeRunError, match="found 0"):
        task_set_from_pairs("none", [])


def test_select_tasks_refuses_unknown_tasks_and_too_few_slices(task_set):
    ts, _ = task_set
    cal, test = select_tasks(ts, ["ellipsoid"])
    assert cal and test and {s.task.name for s in cal} == {"ellipsoid"}
    with pytest.raises(MergeRunError, match=r"unknown task\(s\) \['liver'\]; this data has \['ellipsoid', 'label_2'\]"):
        select_tasks(ts, ["liver"])
    with pytest.raises(MergeRunError, match="no task"):
        select_tasks(ts, [])
    ts2 = type(ts)(ts.name, ts.tasks, [s for s in ts.calibration if s.task.name != "label_2"][:5] +
                   [s for s in ts.calibration if s.task.name == "label_2"][:2], ts.test, ts.split)
    with pytest.raises(MergeRunError, match="'label_2' has only 2 calibration slices"):
        select_tasks(ts2, ["ellipsoid", "label_2"])


def test_plan_names_runs_stably_and_checks_multi_fidelity(task_set, pool, tmp_path):
    ts, _ = task_set
    a = plan_run(ts, MergeOptions(("ellipsoid",), trials=10), pool, tmp_path)
    b = plan_run(ts, MergeOptions(("ellipsoid",), trials=10, restart=True), pool, tmp_path)
    c = plan_run(ts, MergeOptions(("ellipsoid",), trials=11), pool, tmp_path)
    assert a.name == b.name and a.name.startswith("ellipsoid-t10-g2-seed0-") and c.name != a.name
    assert a.settings.preprocessing is None and dict(a.settings.own_styles) == STYLES  # the style is searched
    assert not a.one_study and ts.split.startswith("patients")
    # a fixed style, or other own styles of the pool models, is another search space: another run
    fixed = plan_run(ts, MergeOptions(("ellipsoid",), trials=10, preprocessing="medsam"), pool, tmp_path)
    assert fixed.name.startswith("ellipsoid-t10-g2-seed0-prep_medsam-") and fixed.settings.preprocessing == "medsam"
    medsam_styled = dataclasses.replace(pool, models=[dataclasses.replace(m, style="medsam") for m in pool.models])
    own = plan_run(ts, MergeOptions(("ellipsoid",), trials=10), medsam_styled, tmp_path)
    assert own.name != a.name and own.name.startswith("ellipsoid-t10-g2-seed0-")
    assert a.out_dir == tmp_path / a.name and a.variant == "MedSAMix-S"
    every = plan_run(ts, MergeOptions(), pool, tmp_path)
    assert every.settings.tasks == ("ellipsoid", "label_2") and every.variant == "MedSAMix-M"
    with pytest.raises(MergeRunError, match="one task only"):
        plan_run(ts, MergeOptions(min_budget=2), pool, tmp_path)
    with pytest.raises(MergeRunError, match=r"min_budget must lie in \[1, "):
        plan_run(ts, MergeOptions(("ellipsoid",), min_budget=999), pool, tmp_path)
    robust = plan_run(ts, MergeOptions(("ellipsoid",), trials=10, robust=True), pool, tmp_path)
    assert robust.settings.tasks == ("ellipsoid", "ellipsoid@corrupted") and robust.variant == "MedSAMix-M"
    assert robust.name != a.name and len(robust.calibration) == 2 * len(a.calibration)
    assert len(robust.test) == 2 * len(a.test)
    with pytest.raises(MergeRunError, match="one objective only"):
        plan_run(ts, MergeOptions(("ellipsoid",), min_budget=2, robust=True), pool, tmp_path)
    s = SearchSettings(tasks=("a/b",), trials=5)
    assert "/" not in run_name(s, {}) and run_name(s, {}) == run_name(s, {}) != run_name(s, {"pool": 1})


# ------------------------------------------------------------------------------------------------ promotion


def test_promotion_needs_the_merge_not_worse_than_the_best_single_model():
    singles = {"sam": {"a": 0.7, "b": 0.5}, "medsam": {"a": 0.8, "b": 0.6}}
    yes = decide_promotion({"a": 0.8, "b": 0.6}, singles)
    assert yes.promote and yes.best_single == "medsam" and yes.best_single_dice == pytest.approx(0.7)
    assert yes.reason.startswith("promoted: merged calibration Dice 0.7000 >= best single pool model 'medsam'")
    no = decide_promotion({"a": 0.9, "b": 0.4}, singles)
    assert not no.promote and "not promoted" in no.reason and "'medsam' (0.7000" in no.reason
    assert "served model is unchanged" in no.reason
    gain = decide_promotion({"a": 0.8, "b": 0.6}, singles, min_gain=0.05)
    assert not gain.promote and "required gain 0.05" in gain.reason
    with pytest.raises(ValueError):
        decide_promotion({"a": 1.0}, {})


# ------------------------------------------------------------------------------------------------ progress


def test_progress_file_is_replaced_whole_and_dead_runs_read_as_stopped(tmp_path):
    pf = ProgressFile(tmp_path / "sub" / "status.json")
    assert pf.read() == {}
    pf.write({"status": "running", "pid": 1, "epoch": 3, "total_epochs": 10})
    assert pf.update(epoch=4)["epoch"] == 4 and pf.read()["status"] == "running"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["status.json"]  # no temporary files left
    (tmp_path / "sub" / "status.json").write_text("{cut")
    assert pf.read() == {}
    gone = subprocess.Popen(["true"])
    gone.wait()
    pf.write({"status": "running", "pid": gone.pid, "epoch": 3, "total_epochs": 10})
    st = effective_status(pf.read())
    assert st["status"] == "stopped" and "after 3/10 trials" in st["message"] and "resume" in st["message"]
    import os

    pf.write({"status": "running", "pid": os.getpid()})
    assert effective_status(pf.read())["status"] == "running"
    me = process_started(os.getpid())
    assert me is not None
    pf.write({"status": "running", "pid": os.getpid(), "pid_started": me})
    assert effective_status(pf.read())["status"] == "running"
    pf.write({"status": "running", "pid": os.getpid(), "pid_started": me - 3600})  # the id was reused
    assert effective_status(pf.read())["status"] == "stopped"
    pf.write({"status": "failed", "pid": gone.pid, "message": "x"})
    assert effective_status(pf.read()) == {"status": "failed", "pid": gone.pid, "message": "x"}


def test_monitor_reports_resumed_trials_and_best_full_budget_dice(tmp_path, pool):
    pf = ProgressFile(tmp_path / "status.json")
    m = RunMonitor(pf, tmp_path / "run", total=6)
    assert m.fields() == {"epoch": 0, "total_epochs": 6, "best_metric": 0.0}
    cfg = None
    m.on_trial(Trial(0, cfg, {"a": 0.9}, "ok", budget=2), 1)  # subset budget: not comparable
    assert pf.read()["best_metric"] == 0.9  # nothing on the full budget yet
    assert pf.read()["message"] == "trial 1/6: Dice 0.9000 on 2 calibration slices; best 0.9000"
    m.on_trial(Trial(1, cfg, {"a": 0.5}, "ok"), 2)
    m.on_trial(Trial(2, cfg, {}, "crashed: nan"), 3)
    st = pf.read()
    assert st["epoch"] == 3 and st["best_metric"] == 0.5 and st["last_trial"]["status"] == "crashed: nan"
    with open(tmp_path / "run" / "trials.jsonl", "a") as f:
        f.write('{"trial": 3, "stat')  # cut off by a kill
    again = RunMonitor(pf, tmp_path / "run", total=6)
    assert again.fields() == {"epoch": 3, "total_epochs": 6, "best_metric": 0.5}


# ------------------------------------------------------------------------------------------------ runs


def test_run_writes_outputs_and_resumes_after_a_kill_without_losing_trials(task_set, pool, tmp_path):
    ts, _ = task_set
    plan = plan_run(ts, MergeOptions(("ellipsoid",), trials=10), pool, tmp_path)
    seen: list[int] = []

    class Killed(Exception):
        pass

    def stop_after_4(trial: Trial, done: int) -> None:
        seen.append(done)
        if done == 4:
            raise Killed

    with pytest.raises(Killed):
        run_merge(pool, plan.calibration, plan.test, plan.settings, plan.out_dir, plan.split, report=False,
                  on_trial=stop_after_4)
    # a kill while SMAC rewrites its files in place leaves them cut off
    rh = next(plan.out_dir.glob("smac/*/*/runhistory.json"))
    rh.write_text(rh.read_text()[: len(rh.read_text()) // 2])
    out = run_merge(pool, plan.calibration, plan.test, plan.settings, plan.out_dir, plan.split, report=False,
                    on_trial=lambda t, d: seen.append(d))
    assert seen == list(range(1, 11))  # trials 1-4 kept, 5-10 run once
    assert len(out.result.trials) == 10 and [t.number for t in out.result.trials] == list(range(10))
    assert sorted(out.promotion.singles) == ["medicosam", "medsam", "sam"]
    assert out.promotion.merged_dice == pytest.approx(out.calibration_dice["ellipsoid"])
    assert out.recipe.scores["promotion"] == out.promotion.reason and "test_dice" in out.recipe.scores
    for name in ("recipe.yaml", "merged.pth", "history.csv"):
        assert (plan.out_dir / name).is_file()
    history = (plan.out_dir / "history.csv").read_text().splitlines()
    assert len(history) == 11 and history[0].endswith(",stage,preprocessing")
    assert {row.rsplit(",", 1)[1] for row in history[1:]} == {"sam", "medsam"}  # medsam: the medsam model alone
    assert out.recipe.style == out.result.best.config.preprocessing and out.recipe.merge.preprocessing is None
    assert [p.name for p in plan.out_dir.glob("smac.checkpoint-*")] == ["smac.checkpoint-10"]
    assert not list(plan.out_dir.glob(".*tmp*"))
    # asking again changes nothing and evaluates nothing
    seen.clear()
    again = run_merge(pool, plan.calibration, plan.test, plan.settings, plan.out_dir, plan.split, report=False,
                      on_trial=lambda t, d: seen.append(d))
    assert seen == [] and again.result.best.dice == out.result.best.dice
    json.loads(rh.read_text())
