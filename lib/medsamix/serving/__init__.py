"""Serving: prompt parsing, the segmenter over one served model, and the interactive service the app calls."""
