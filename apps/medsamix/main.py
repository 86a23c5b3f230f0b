"""MedSAMix MONAI Label app: the merged SAM model and each pool model as deepgrow-type infer tasks, and the merge
search as the "merge" train task.

Start (offline, nothing is downloaded)::

    monailabel start_server --app apps/medsamix --studies .demo/studies --host 127.0.0.1 --port 8000

Configuration (``--conf key value``):

* ``pool``: folder with ``pool.yaml`` (default: the repository's ``sample-data/pool``).
* ``models``: ``alias=path,alias=path`` checkpoint files instead of a pool folder (first = base);
  ``preprocessing``: ``alias=style,...`` for them ("sam" or "medsam", default "sam").
* ``merged_preprocessing``: preprocessing of the uniform merge served before anything is published (default: the
  base model's); a published merge is served with the style its recipe records (searched or fixed by the run).
* ``model_dir``: the app's model folder (default ``apps/medsamix/model``); merged models are published to
  ``<model_dir>/merged`` and picked up by the ``medsamix`` infer task without a restart (what a publish killed
  midway left there is removed at server start).
* ``labels``: label names, comma-separated (values 1, 2, ...) or JSON (``{"name": value}``) (default:
  ``<studies>/.medsamix-labels.json`` written by ``scripts/make_sample_studies.py``, else "foreground";
  ``medsamix.data.tasks.datastore_label_names``, which the merge train task reads too).
* ``iou_threshold`` (0.4), ``margin`` (2): defaults of 3D propagation.
* ``device``: where the models run (default ``cuda`` when available, else ``cpu``).
* ``preencode`` ("true"): background pre-encoding of an opened volume's slices for the model prompted (the merged
  model when an image is downloaded or uploaded); ``preencode_slices`` (256): slice budget per volume; the environment
  variables ``MEDSAMIX_PREENCODE=0`` / ``MEDSAMIX_PREENCODE_SLICES`` override both.
* ``bf16`` ("false"): bf16 autocast for the image encoder of every served model on CUDA (faster; fp32 by default,
  and always on a CPU). Turn it on only where ``scripts/gpu_check.sh`` showed no Dice cost on that GPU.
* ``max_slices`` (no limit): most slices one prompt may segment; ``max_voxels`` (no limit): largest volume read
  (checked on the header first). The hardened server (``medsamix-server``) sets both from its limits.

Images are datastore ids, or a session's image (a volume the client uploaded with ``PUT /session/``, as 3D Slicer does
for local volumes). Bad requests (unknown model, image not in the datastore, any other server file path as the image,
a prompt outside the volume or empty, a 2D image) are answered with HTTP 4xx and the reason.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.infers.interactive import InteractiveInfer
from medsamix.data.tasks import datastore_label_names
from medsamix.errors import ConfigError, MedSAMixError, check_flag
from medsamix.models.encoding import default_device
from medsamix.runs.publish import clean_incomplete
from medsamix.serving.preencode import PreEncoder
from medsamix.serving.segmenter import DEFAULT_IOU_THRESHOLD, DEFAULT_MARGIN, EmbeddingCache
from medsamix.serving.service import InteractiveService, MergedModelSource, PoolLoader
from medsamix.data.volumes import VolumeCache

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
MERGED_TASK = "medsamix"


def _resolve(path: str) -> Path:
    """A conf path: as given if it exists (absolute or relative to the working folder), else relative to the repo."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else REPO / p


class MedSAMixApp(MONAILabelApp):
    """The MONAI Label app (see the module docstring)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        self.pool_dir = None if conf.get("models") else _resolve(conf.get("pool", "sample-data/pool"))
        self.pool = PoolLoader(self.pool_dir, conf.get("models"), conf.get("preprocessing"))
        model_dir = Path(conf["model_dir"]).expanduser() if conf.get("model_dir") else Path(app_dir) / "model"
        self.published_dir = model_dir / "merged"
        self.published_dir.mkdir(parents=True, exist_ok=True)
        names = datastore_label_names(conf.get("labels"), studies)  # as the merge train task names them
        self.label_names = [names[v] for v in sorted(names)]
        self.iou_threshold = float(conf.get("iou_threshold", DEFAULT_IOU_THRESHOLD))
        self.margin = float(conf.get("margin", DEFAULT_MARGIN))
        self.device = default_device(conf.get("device"))
        logger.info("MedSAMix models run on %s", self.device)
        self.max_slices = int(conf["max_slices"]) if conf.get("max_slices") else None
        self.volumes = VolumeCache(max_voxels=int(conf["max_voxels"]) if conf.get("max_voxels") else None)
        self.embeddings = EmbeddingCache()
        raw = conf.get("preencode_slices") or ""
        if raw and not raw.strip().isdigit():
            raise ValueError(f"conf preencode_slices: expected a whole number of slices >= 0, got {raw!r}")
        preencode = check_flag(conf.get("preencode"), "conf preencode", ConfigError, default=True)
        self.preencoder = PreEncoder.from_env(preencode, int(raw) if raw else None)
        self.bf16 = check_flag(conf.get("bf16"), "conf bf16", ConfigError)
        if self.bf16 and not str(self.device).startswith("cuda"):
            logger.warning("conf bf16: bf16 autocast applies on CUDA only; the image encoder runs in fp32 on %s",
                           self.device)
        self._merged_service: InteractiveService | None = None
        self.merged = MergedModelSource(self.pool, self.published_dir, MERGED_TASK, conf.get("merged_preprocessing"))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedSAMix",
            description="Layer-wise merged Segment-Anything models (MedSAMix) for box/point-prompt segmentation",
            version="0.1.0",
            labels=self.label_names,
        )

    def _service(self, name: str, source: Any, status: Any = None) -> InteractiveService:
        return InteractiveService(name, source, self.volumes, self.embeddings, self.iou_threshold, self.margin,
                                  status, self.device, self.max_slices, self.preencoder, self.bf16)

    def open_image(self, path: str) -> None:
        """A client opened (downloaded or uploaded) ``path``: pre-encode it for the merged model in the background."""
        service = self._merged_service
        if service is None or not self.preencoder.enabled:
            return

        def run() -> None:
            try:
                service.open_image(path)
            except (MedSAMixError, OSError, ValueError) as e:  # not an image the models can segment: nothing to do
                logger.info("no pre-encoding for %s: %s", path, e)

        threading.Thread(target=run, name="medsamix-open-image", daemon=True).start()

    def init_infers(self) -> dict[str, InferTask]:
        # Models are built on first use (MONAI Label also builds the app in each training subprocess, which never
        # segments); the server preloads them in on_init_complete.
        self._merged_service = self._service(MERGED_TASK, self.merged.get, lambda: self.merged.warning)
        infers: dict[str, InferTask] = {
            MERGED_TASK: InteractiveInfer(self._merged_service, self.label_names, self.merged.describe)
        }
        for alias in self.pool.aliases:
            infers[alias] = InteractiveInfer(self._service(alias, lambda a=alias: self.pool.member(a)),
                                             self.label_names, lambda a=alias: self.pool.describe(a))
        return infers

    def infer_names(self) -> list[str]:
        """Names of the infer tasks (the merged model and each pool model)."""
        return sorted(self._infers)

    def train_names(self) -> list[str]:
        """Names of the train tasks."""
        return sorted(self._trainers)

    def info_strategies(self) -> list[str]:
        """Names of the active-learning strategies."""
        return sorted(self._strategies)

    def trainer(self, name: str) -> TrainTask | None:
        return self._trainers.get(name)

    def on_init_complete(self) -> None:
        """Server start-up (not run in training subprocesses): load the pool and build every model now, so the
        first click does not pay for it; a broken pool stops the server here with the reason. Leftovers of a publish
        killed midway (``versions/.tmp-*``) are removed first."""
        clean_incomplete(self.published_dir)  # logs what it removes
        self.merged.get()
        for alias in self.pool.aliases:
            self.pool.member(alias)
        super().on_init_complete()

    def init_trainers(self) -> dict[str, TrainTask]:
        try:
            from lib.trainers.merge import MergeTrain
        except ImportError as e:
            logger.warning("merge train task unavailable: %s", e)
            return {}
        return {"merge": MergeTrain(app_dir=self.app_dir, studies=self.studies,
                                    pool_dir=str(self.pool_dir or ""), published_dir=str(self.published_dir),
                                    conf=self.conf)}

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's infer with input checks that answer HTTP 4xx with the reason instead of 500."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404,
                                detail=f"unknown model {model!r}; available: {', '.join(sorted(self._infers))}")
        image = request.get("image")
        if self._session_image(request):
            return self._infer_checked(request, datastore)
        ds = datastore or self.datastore()
        if not isinstance(image, str) or not image:
            raise HTTPException(status_code=400, detail="no image: give the id of a datastore image")
        try:
            uri = ds.get_image_uri(image)
        except Exception as e:  # noqa: BLE001 - remote datastores (DICOMweb) raise anything for an unknown series
            raise HTTPException(status_code=404, detail=f"image {image!r} could not be fetched from the datastore: "
                                f"{type(e).__name__}: {e}") from None
        if not uri:
            if os.path.isabs(image) or os.path.exists(image):
                raise HTTPException(status_code=400, detail=(
                    f"image {image!r} is a file path; only datastore image ids are accepted (upload the image to the "
                    "datastore first: PUT /datastore/image)"))
            raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore")
        return self._infer_checked(request, datastore)

    def _session_image(self, request: dict[str, Any]) -> bool:
        """The image is the file of a MONAI Label session (a volume the client uploaded with PUT /session/, as 3D
        Slicer does for local volumes): the endpoint resolved the session id, and the file lies in the sessions
        folder. Any other file path is refused."""
        image, sessions = request.get("image"), self.sessions()
        if not request.get("session") or not sessions or not isinstance(image, str) or not image:
            return False
        root = os.path.realpath(sessions.store_path)
        return os.path.commonpath([root, os.path.realpath(image)]) == root

    def _infer_checked(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        try:
            return super().infer(request, datastore)
        except MedSAMixError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
