"""MedSAMix core library: layer-wise merging of Segment-Anything-family checkpoints.

No MONAI Label imports here: the server app under ``apps/`` builds on this package.
"""

from .architecture import VIT_B, ArchSpec, infer_arch
from .checkpoint import LoadReport, load_sam_checkpoint, save_sam_checkpoint, sha256_file
from .config import GroupSetting, MergeConfig
from .errors import CheckpointError, ConfigError, MedSAMixError, PoolError
from .groups import Group, group_parameters
from .merger import MergeError, Merger
from .methods import REGISTRY, MergeMethod, Sources, get_method, register
from .pool import ModelPool, PoolMember
from .recipe import ModelRef, Recipe, check_checksums

__all__ = [
    "VIT_B", "ArchSpec", "infer_arch", "LoadReport", "load_sam_checkpoint", "save_sam_checkpoint", "sha256_file",
    "GroupSetting", "MergeConfig", "CheckpointError", "ConfigError", "MedSAMixError", "PoolError", "Group",
    "group_parameters", "MergeError", "Merger", "REGISTRY", "MergeMethod", "Sources", "get_method", "register",
    "ModelPool", "PoolMember", "ModelRef", "Recipe", "check_checksums",
]
