"""monoscope: find the human-interpretable features inside language models.

Two complementary tools: k-sparse probing of neurons (Gurnee et al. 2023) and sparse autoencoders
(TopK, BatchTopK, JumpReLU, Gated, ReLU+L1, Matryoshka), plus the interpretation around them.
"""
from monoscope.errors import MonoscopeError

__version__ = "0.1.0"
__all__ = ["MonoscopeError", "__version__"]
