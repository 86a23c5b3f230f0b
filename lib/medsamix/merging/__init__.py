"""Merging: parameter groups, the merge-method registry and its kernels, merge configurations, the merger, recipes."""
