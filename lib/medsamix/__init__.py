"""MedSAMix core library: layer-wise merging of Segment-Anything-family checkpoints.

No MONAI Label imports here: the server app under ``apps/`` builds on this package.
"""

from .architecture import TINY256, VIT_B, ArchSpec, infer_arch
from .checkpoint import LoadReport, load_sam_checkpoint, save_sam_checkpoint, sha256_file
from .config import GroupSetting, MergeConfig
from .errors import CheckpointError, ConfigError, MedSAMixError, PoolError, StudyError
from .evaluate import DiceResult, Evaluator
from .groups import Group, group_parameters
from .merger import MergeError, Merger
from .methods import REGISTRY, MergeMethod, Sources, get_method, register
from .pool import ModelPool, PoolManifest, PoolMember
from .preprocess import Preprocessor
from .recipe import ModelRef, Recipe, check_checksums
from .slices import SliceSample, extract_slices, tight_box
from .studies import Study, load_studies, load_study
from .tasks import Task, split_patients, split_slabs

__all__ = [
    "VIT_B", "ArchSpec", "infer_arch", "LoadReport", "load_sam_checkpoint", "save_sam_checkpoint", "sha256_file",
    "GroupSetting", "MergeConfig", "CheckpointError", "ConfigError", "MedSAMixError", "PoolError", "Group",
    "group_parameters", "MergeError", "Merger", "REGISTRY", "MergeMethod", "Sources", "get_method", "register",
    "ModelPool", "PoolMember", "ModelRef", "Recipe", "check_checksums", "TINY256", "StudyError", "DiceResult",
    "Evaluator", "PoolManifest", "Preprocessor", "SliceSample", "extract_slices", "tight_box", "Study",
    "load_studies", "load_study", "Task", "split_patients", "split_slabs",
]
