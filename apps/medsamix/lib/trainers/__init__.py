"""Train tasks of the MedSAMix app."""
