"""Data: image and label IO, labelled studies, tasks and patient/slab splits, 2D slice samples with their prompts."""
