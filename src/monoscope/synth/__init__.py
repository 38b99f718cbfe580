"""Synthetic activations with known features (SynthSAEBench) and ground-truth metrics for SAEs."""
