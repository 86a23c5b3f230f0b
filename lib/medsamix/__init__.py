"""MedSAMix core library: layer-wise merging of Segment-Anything-family checkpoints.

No MONAI Label imports here: the server app under ``apps/`` builds on this package.
"""

from medsamix.models.architecture import TINY256, VIT_B, ArchSpec, infer_arch
from medsamix.models.checkpoint import LoadReport, load_sam_checkpoint, save_sam_checkpoint, sha256_file
from medsamix.merging.config import GroupSetting, MergeConfig
from medsamix.errors import CheckpointError, ConfigError, MedSAMixError, PoolError, StudyError
from medsamix.search.evaluate import DiceResult, Evaluator
from medsamix.merging.groups import Group, group_parameters
from medsamix.merging.merger import MergeError, Merger
from medsamix.merging.methods import REGISTRY, MergeMethod, Sources, get_method, register, unregister
from medsamix.models.pool import ModelPool, PoolManifest, PoolMember
from medsamix.models.preprocess import Preprocessor
from medsamix.merging.recipe import ModelRef, Recipe, check_checksums
from medsamix.data.slices import SliceSample, extract_slices, tight_box
from medsamix.data.studies import Study, load_studies, load_study
from medsamix.data.tasks import Task, split_patients, split_slabs

__all__ = [
    "VIT_B", "ArchSpec", "infer_arch", "LoadReport", "load_sam_checkpoint", "save_sam_checkpoint", "sha256_file",
    "GroupSetting", "MergeConfig", "CheckpointError", "ConfigError", "MedSAMixError", "PoolError", "Group",
    "group_parameters", "MergeError", "Merger", "REGISTRY", "MergeMethod", "Sources", "get_method", "register",
    "unregister",
    "ModelPool", "PoolMember", "ModelRef", "Recipe", "check_checksums", "TINY256", "StudyError", "DiceResult",
    "Evaluator", "PoolManifest", "Preprocessor", "SliceSample", "extract_slices", "tight_box", "Study",
    "load_studies", "load_study", "Task", "split_patients", "split_slabs",
]
