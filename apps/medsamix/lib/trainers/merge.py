"""The "merge" train task: MedSAMix search on the datastore's labelled studies (first version, being written)."""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask


class MergeTrain(TrainTask):
    """Search a layer-wise merge of the pool on the labelled studies and publish it (work in progress)."""

    def __init__(self, app_dir: str, studies: str, pool_dir: str, published_dir: str, conf: dict[str, str]) -> None:
        super().__init__("MedSAMix merge search (SMAC) on the labelled studies")
        self.app_dir, self.studies, self.pool_dir, self.published_dir, self.conf = (
            app_dir, studies, pool_dir, published_dir, dict(conf))

    def config(self) -> dict[str, Any]:
        return {"task": "", "trials": 30, "granularity": 2, "min_budget": 0, "seed": 0, "restart": False}

    def stats(self) -> dict[str, Any]:
        return {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        raise NotImplementedError("merge training is being written")
