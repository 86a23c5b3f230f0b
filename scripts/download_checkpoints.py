#!/usr/bin/env python
"""Download and verify the public SAM-family ViT-B checkpoints - a thin wrapper of ``medsamix-download-checkpoints`` (:mod:`medsamix.cli.download_checkpoints`); ``--help`` says more."""

from medsamix.cli.download_checkpoints import main

if __name__ == "__main__":
    raise SystemExit(main())
