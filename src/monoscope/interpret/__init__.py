"""Interpreting features: one-pass statistics (stats), steering (steer), automated explanations (autointerp)."""
