"""The "merge" train task: a MedSAMix search on the datastore's labelled studies, published for the infer task.

MONAI Label runs a train request in a subprocess (``POST /train/merge`` -> ``python -m monailabel.interfaces.utils.app
-m train``), which builds the app and calls :meth:`MergeTrain.__call__`; ``GET /info`` / ``GET /train`` are answered by
the server process, which calls :meth:`MergeTrain.stats`. Progress therefore goes through a small JSON file,
``<runs_dir>/status.json``, replaced atomically after every trial. ``DELETE /train/`` kills the subprocess; every
finished trial is already in the run's folder (``<runs_dir>/<run name>/``, one stable folder per combination of
settings and data), so the same request resumes the search. The task holds a lock on ``<runs_dir>`` and
:func:`~medsamix.runs.run.run_merge` one on the run folder (:mod:`medsamix.runs.lock`): a request while an earlier
task still runs (e.g. one started before a server restart) is refused with 409, and ``restart`` empties the run
folder under its lock (:func:`~medsamix.runs.lock.discard_run`), never under a live run.

Request options (all optional; strings are accepted): ``task`` (or ``tasks`` / ``labels``; one name -> MedSAMix-S,
several comma-separated -> MedSAMix-M, empty -> every label of the data), ``trials``, ``granularity`` (ViT blocks per
encoder group), ``separate``, ``min_budget`` (multi-fidelity, one task; 0 = off), ``seed``, ``restart``
(discard the stored trials of these settings), ``preprocessing`` of the merged model ("sam" / "medsam" fixes it;
empty = searched as the hyper-parameter ``prep:style``, each pool model entering the initial design with its own
style), ``min_gain`` (calibration Dice the merged model must gain over the best single pool model to be published;
0 = not worse is enough), ``robust`` (add the corrupted Dice ``<task>@corrupted`` of every task as an objective,
:mod:`medsamix.search.corruptions`; a single task becomes a two-objective ParEGO search), ``objective`` ("box":
Dice of box prompts; "interactive": the box then ``rounds`` correction clicks in the largest error region, a slice's
Dice averaged over the rounds, :mod:`medsamix.search.interactive`) and ``rounds`` (1-20; used by "interactive").

Calibration / test: 20% of the labelled studies against the rest; with a single labelled study, slabs of its
labelled slices (``medsamix.data.tasksets.one_study_task_set``), which the status's ``split`` and message say.

App configuration (``--conf``): ``model_dir`` (runs go to ``<model_dir>/runs``; default: next to the published
folder), ``labels`` (the app's label names: comma-separated for values 1, 2, ... or ``{"name": value}`` JSON; else
``<studies>/.medsamix-labels.json``; else value 1 is "foreground"; unnamed values are ``label_<value>``),
``models`` / ``preprocessing`` / ``pool`` (the pool, as for the app; each model's own style),
``merge_trials`` (default trials), ``merge_report`` (``false`` skips the
run's ``report.md``: single models and uniform merges scored on calibration and test slices, with figures),
``device`` (where the search runs; default ``cuda`` when available, else ``cpu``).

Everything that does not depend on MONAI Label is in :mod:`medsamix.runs.run`; this class only maps the request
and the datastore onto it and publishes with :mod:`medsamix.runs.publish`.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from medsamix.errors import MedSAMixError
from medsamix.data.tasks import datastore_label_names
from medsamix.data.tasksets import ONE_STUDY_SPLIT, task_set_from_pairs
from medsamix.models.encoding import default_device
from medsamix.runs.options import MergeOptions
from medsamix.runs.plan import RunPlan, plan_run
from medsamix.runs.progress import ACTIVE, ProgressFile, RunMonitor, RunStatus, effective_status
from medsamix.runs.run import MergeOutcome, run_merge
from medsamix.runs.publish import publish_outcome
from medsamix.runs.lock import RunLock, RunLockedError, discard_run, process_started
from medsamix.models.pool import ModelPool
from medsamix.serving.service import load_served_pool
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)


class MergeTrain(TrainTask):
    """Search a layer-wise merge of the model pool on the labelled studies and publish it if it is not worse than
    the best single pool model on the calibration slices.

    Args:
        app_dir: The app folder.
        studies: The datastore location given to the server.
        pool_dir: Folder with ``pool.yaml`` and the pool checkpoints.
        published_dir: Served model folder (:mod:`medsamix.runs.publish`); the infer task reloads on a new version.
        conf: App configuration (see the module docstring).
    """

    def __init__(self, app_dir: str, studies: str, pool_dir: str, published_dir: str, conf: dict[str, str]) -> None:
        super().__init__("MedSAMix: search a layer-wise merge of the model pool on the labelled studies (SMAC); "
                         "one task -> MedSAMix-S, several -> MedSAMix-M")
        self.app_dir = Path(app_dir)
        self.studies = studies
        self.pool_dir = Path(pool_dir) if pool_dir else None
        self._served: ModelPool | None = None
        self.published_dir = Path(published_dir)
        self.conf = dict(conf or {})
        model_dir = self.conf.get("model_dir")
        self.runs_dir = Path(model_dir) / "runs" if model_dir else self.published_dir.parent / "runs"
        self.progress = ProgressFile(self.runs_dir / "status.json")
        self.report = self.conf.get("merge_report", "true").strip().lower() not in ("false", "0", "no", "off")
        self.device = default_device(self.conf.get("device"))
        self._defaults: dict[str, Any] = {"task": "", "trials": int(self.conf.get("merge_trials", 30)),
                                          "granularity": 2, "separate": False, "min_budget": 0, "seed": 0,
                                          "restart": False, "preprocessing": "", "min_gain": 0.0,
                                          "robust": False, "objective": "box", "rounds": 3}

    def config(self) -> dict[str, Any]:
        """The options shown by Slicer / OHIF (and sent back with the train request)."""
        return dict(self._defaults)

    def check_options(self, request: dict[str, Any]) -> MergeOptions:
        """The request's options, checked before any process starts (the hardened server calls this).

        Raises:
            MedSAMixError: A bad value, with the option's name."""
        return MergeOptions.from_mapping(request, self._defaults)

    def stats(self) -> dict[str, Any]:
        """Progress of the current or last run: ``epoch`` (trials done), ``total_epochs``, ``best_metric`` (best
        calibration Dice so far), ``status``, ``message``, ``start_ts`` and, when finished, ``total_time``."""
        data = effective_status(self.progress.read())
        if not data:  # nothing has run: the OHIF panel reads an empty entry as "100 %, 1/1 epochs"
            return {"status": RunStatus.IDLE, "epoch": 0, "total_epochs": int(self._defaults["trials"]),
                    "best_metric": 0.0, "total_time": "0:00:00", "message": "no merge run yet"}
        if data.get("status") in ACTIVE and data.get("start_ts"):
            data["current_time"] = str(datetime.timedelta(seconds=int(time.time() - float(data["start_ts"]))))
        return data

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """Run (or resume) the search of ``request`` on ``datastore``'s labelled studies; publish if promoted.

        Raises:
            HTTPException: 400 for bad options, too few labelled studies, an unknown task ... with the reason
                (also in :meth:`stats`). In MONAI Label's train subprocess this ends the process with an error
                (task status ERROR, the reason in its details) and the server keeps running; with
                ``POST /train/merge?run_sync=true`` the client gets the 400 itself. 409 when another merge train
                task of this app still runs (one started before a server restart): its progress is left as is.
        """
        lock = RunLock(self.runs_dir)  # one merge train task per runs folder (and its status.json)
        try:
            lock.acquire()
        except RunLockedError as e:
            logger.error("merge training refused: %s", e)
            raise HTTPException(status_code=409, detail=str(e)) from None
        try:
            return self._call(request, datastore)
        finally:
            lock.release()

    def _call(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        start = time.time()
        self.progress.write({"status": RunStatus.PREPARING, "pid": os.getpid(),
                             "pid_started": process_started(os.getpid()), "start_ts": int(start), "epoch": 0,
                             "total_epochs": 0, "best_metric": 0.0, "message": "reading the labelled studies",
                             "request": {k: v for k, v in request.items() if k in self._defaults or k == "model"}})
        try:
            options = MergeOptions.from_mapping(request, self._defaults)
            self.progress.update(total_epochs=options.trials)
            names = datastore_label_names(self.conf.get("labels"), self.studies)  # as the app names its labels
            plan = self._plan(options, names, datastore)
            outcome, version = self._run(plan, options, start)
            return self._finish(plan, outcome, version, start)
        except MedSAMixError as e:
            self.progress.update(status=RunStatus.FAILED, message=str(e), total_time=_elapsed(start))
            logger.error("merge training failed: %s", e)
            raise HTTPException(status_code=400, detail=str(e)) from None
        except Exception as e:
            self.progress.update(status=RunStatus.FAILED, message=f"{type(e).__name__}: {e}",
                                 total_time=_elapsed(start))
            logger.exception("merge training failed")
            raise

    def _plan(self, options: MergeOptions, names: dict[int, str], datastore: Datastore) -> RunPlan:
        labelled = sorted(datastore.get_labeled_images())
        unlabelled = sorted(set(datastore.list_images()) - set(labelled))
        if not labelled:
            raise MedSAMixError(f"no labelled studies: none of the {len(unlabelled)} images in the datastore has a "
                                "final label; save (submit) at least 1 label first")
        # datalist(): image/label files of the studies with a final label, for any datastore (a DICOMweb one fetches
        # the DICOM SEGs from the PACS and converts them; there a label id is the SEG's series, not the image id).
        # A SEG keeps only the frames it needs, so its label may cover a block of the image grid (sub_blocks).
        pairs = [(d["image"], d["label"]) for d in datastore.datalist()]
        task_set, skipped = task_set_from_pairs(Path(str(self.studies)).name or "datastore", pairs, names,
                                                options.seed, sub_blocks=True)
        self._served = load_served_pool(self.pool_dir, self.conf.get("models"), self.conf.get("preprocessing"))
        plan = plan_run(task_set, options, self._served, self.runs_dir)
        notes = []
        if unlabelled:
            notes.append(f"{_count(len(unlabelled), 'study', 'studies')} without a final label not used")
        if skipped:
            notes.append(f"{_count(len(skipped), 'labelled study', 'labelled studies')} skipped: " + "; ".join(
                f"{Path(s.path).name}: {s.reason}" for s in skipped[:3]))
        self.progress.update(run=plan.name, variant=plan.variant, tasks=list(plan.settings.tasks),
                             split=plan.split, calibration_slices=len(plan.calibration),
                             test_slices=len(plan.test), notes=notes, message=f"calibration / test: {plan.split}")
        for n in notes:
            logger.warning(n)
        return plan

    def _run(self, plan: RunPlan, options: MergeOptions, start: float) -> tuple[MergeOutcome, str | None]:
        """Run the search; the merged model is published (if promoted) before the run's report is written.

        Returns:
            The outcome and the published version (``None`` when not promoted)."""
        if options.restart and plan.out_dir.exists():
            logger.info("restart: discarding %s", plan.out_dir)
            discard_run(plan.out_dir)  # under the run folder's lock: refused while another process runs there
        monitor = RunMonitor(self.progress, plan.out_dir, plan.settings.trials)
        resumed = monitor.done
        self.progress.update(status=RunStatus.RUNNING, **monitor.fields(), resumed_trials=resumed, device=self.device,
                             message=(f"{plan.variant} on {', '.join(plan.settings.tasks)}: "
                                      + (f"resuming after {resumed} trials" if resumed else "starting")
                                      + (f" ({plan.split})" if plan.one_study else "")))
        logger.info("merge run %s (%s) in %s on %s; %d trials already done", plan.name, plan.variant, plan.out_dir,
                    self.device, resumed)
        published: list[str | None] = [None]

        def ready(outcome: MergeOutcome) -> None:  # publish before the (long) report is written
            self.progress.update(status=RunStatus.FINISHING, epoch=plan.settings.trials,
                                 best_metric=outcome.promotion.merged_dice,
                                 message="publishing" + (", then scoring references for the report" if self.report
                                                         else ""))
            if outcome.promotion.promote:  # the library's publish step (also scripts/merge_search.py --publish)
                published[0] = publish_outcome(self.published_dir, plan, outcome).version

        outcome = run_merge(self._served, plan.calibration, plan.test, plan.settings, plan.out_dir, plan.split,
                            on_trial=monitor.on_trial, report=self.report,
                            min_gain=options.min_gain, device=self.device, on_ready=ready)
        return outcome, published[0]

    def _finish(self, plan: RunPlan, outcome: MergeOutcome, version: str | None, start: float) -> dict[str, Any]:
        promotion = outcome.promotion
        if promotion.promote:
            message = f"{promotion.reason}; published version {version}"
        else:
            message = promotion.reason
        if plan.one_study:
            message += f" ({ONE_STUDY_SPLIT})"
        logger.info("merge run %s: %s", plan.name, message)
        result = {
            "run": plan.name, "variant": plan.variant, "tasks": list(plan.settings.tasks),
            "trials": plan.settings.trials, "extra_full_budget_scores": _extra(plan, outcome), "split": plan.split,
            "preprocessing": outcome.recipe.style,
            "calibration_dice": outcome.calibration_dice, "test_dice": outcome.test_dice, "promoted": promotion.promote, "promotion": promotion.to_dict(),
            "published_version": version, "out_dir": str(plan.out_dir),
            "report": str(plan.out_dir / "report.md") if (plan.out_dir / "report.md").is_file() else None,
        }
        self.progress.update(status=RunStatus.DONE, epoch=plan.settings.trials, best_metric=promotion.merged_dice,
                             total_time=_elapsed(start), message=message, promoted=promotion.promote,
                             published_version=version, promotion=promotion.to_dict(),
                             preprocessing=outcome.recipe.style,
                             extra_full_budget_scores=result["extra_full_budget_scores"],
                             calibration_dice=outcome.calibration_dice, test_dice=outcome.test_dice)
        return result


def _extra(plan: RunPlan, outcome: MergeOutcome) -> int:
    """Evaluations after the SMAC trials: with multi-fidelity, initial-design configurations Hyperband dropped
    early are scored on all calibration slices before selection (``medsamix.search.search.run_search``)."""
    return max(0, len(outcome.result.trials) - plan.settings.trials)


def _elapsed(start: float) -> str:
    return str(datetime.timedelta(seconds=int(time.time() - start)))


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
