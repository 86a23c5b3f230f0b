"""Search: the SMAC configuration space, scoring of merged models on slices, the search itself and its report."""
