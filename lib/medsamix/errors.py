"""Exception types raised by the MedSAMix core library.

Every error carries a message that names the offending file or field, so that a command-line tool or a server can
pass it on verbatim to the user.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


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


ECHO_CHARS = 40  # how much of a rejected value an error message repeats


def check_choice(value: object, choices: Iterable[Any], what: str, error: type[MedSAMixError] = MedSAMixError) -> Any:
    """``value`` if it is one of ``choices``; otherwise raise ``error`` with the message
    ``"<what>: must be one of [...], got <value>"`` (the value's ``repr`` cut to :data:`ECHO_CHARS` characters: a
    request field may be arbitrarily long). The owners of each set of choices (preprocessing styles, CT windows,
    granularities, objectives) wrap this once, so every layer that checks a value says the same thing."""
    allowed = list(choices)
    if value not in allowed:
        raise error(f"{what}: must be one of {allowed}, got {echo(value)}")
    return value


def echo(value: object) -> str:
    """``repr(value)`` cut to :data:`ECHO_CHARS` characters, for an error message about a rejected value."""
    shown = repr(value)
    return shown if len(shown) <= ECHO_CHARS else shown[:ECHO_CHARS] + "..."


FLAG_WORDS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}


def check_flag(value: object, what: str, error: type[MedSAMixError] = MedSAMixError, default: bool = False) -> bool:
    """A true/false setting: a bool, 0 / 1, or one of :data:`FLAG_WORDS` (any case); ``None`` or an empty string
    give ``default``. Anything else raises ``error`` with ``"<what>: expected true or false, got <value>"``."""
    if value is None or isinstance(value, str) and not value.strip():
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in FLAG_WORDS:
        return FLAG_WORDS[value.strip().lower()]
    raise error(f"{what}: expected true or false, got {echo(value)}")
