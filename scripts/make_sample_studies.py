#!/usr/bin/env python
"""Write the demo server's sample studies - a thin wrapper of ``medsamix-make-sample-studies`` (:mod:`medsamix.cli.make_sample_studies`); ``--help`` says more."""

from medsamix.cli.make_sample_studies import main

if __name__ == "__main__":
    raise SystemExit(main())
