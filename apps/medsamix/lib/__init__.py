"""MedSAMix MONAI Label app: infer and train tasks (thin layers over lib/medsamix)."""
