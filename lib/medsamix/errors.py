"""Exception types raised by the MedSAMix core library.

Every error carries a message that names the offending file or field, so that a command-line tool or a server can
pass it on verbatim to the user.
"""

from __future__ import annotations


class MedSAMixError(ValueError):
    """Base class of all user-facing errors of the library."""


class CheckpointError(MedSAMixError):
    """A checkpoint file is missing, unreadable, not a SAM checkpoint or of the wrong architecture."""


class PoolError(MedSAMixError):
    """The models of a pool do not fit together (aliases, keys, shapes)."""


class ConfigError(MedSAMixError):
    """A merge configuration or recipe names an unknown group or method, or a parameter is out of range."""


class StudyError(MedSAMixError):
    """A study (image and label) is missing, unreadable, or its image and label do not fit together."""


class MergeRunError(MedSAMixError):
    """A merge run cannot start: no or too few labelled studies, unknown task, too few slices, bad option."""
