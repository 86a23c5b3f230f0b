"""Infer tasks of the MedSAMix app."""
