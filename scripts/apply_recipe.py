#!/usr/bin/env python
"""Apply a MedSAMix recipe to the pool's checkpoint files and write the merged checkpoint - a thin wrapper of ``medsamix-apply-recipe`` (:mod:`medsamix.cli.apply_recipe`); ``--help`` says more."""

from medsamix.cli.apply_recipe import main

if __name__ == "__main__":
    raise SystemExit(main())
