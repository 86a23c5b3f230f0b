#!/usr/bin/env python
"""MedSAMix search from the command line - a thin wrapper of ``medsamix-merge-search`` (:mod:`medsamix.cli.merge_search`); ``--help`` says more."""

from medsamix.cli.merge_search import main

if __name__ == "__main__":
    raise SystemExit(main())
