#!/usr/bin/env python
"""Train the tiny model pool - a thin wrapper of ``medsamix-train-pool`` (:mod:`medsamix.cli.train_pool`); ``--help`` says more."""

from medsamix.cli.train_pool import main

if __name__ == "__main__":
    raise SystemExit(main())
