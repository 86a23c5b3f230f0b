"""The command-line tools, each a module with ``main(argv=None) -> int`` (the exit status).

Installed as console entry points (``pyproject.toml``'s ``[project.scripts]``): ``medsamix-merge-search``
(:mod:`.merge_search`), ``medsamix-apply-recipe`` (:mod:`.apply_recipe`), ``medsamix-train-pool``
(:mod:`.train_pool`), ``medsamix-make-sample-studies`` (:mod:`.make_sample_studies`) and
``medsamix-download-checkpoints`` (:mod:`.download_checkpoints`); ``python -m medsamix.cli.<name>`` and the thin
wrappers ``scripts/<name>.py`` run the same ``main``.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
"""The repository root of this (editable) installation: the defaults ``sample-data/pool`` and ``../shared/data``
are found from it."""
SHARED_DATA = REPO.parent / "shared" / "data"
"""The shared real-image data (``../shared/data`` next to the repository)."""
