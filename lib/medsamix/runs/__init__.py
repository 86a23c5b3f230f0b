"""Runs: one merge run end to end (plan, search, promotion, progress), its folder lock and publishing the result."""
