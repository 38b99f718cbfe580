"""Sparse probing (Gurnee et al. 2023): which few neurons or latents carry a binary feature?

The numeric core works on numpy arrays: split by sequence, rank features on the train split, fit an L2
logistic probe on the top k, score it on held-out sequences; ``adaptive_thresholding`` is the paper's main
selection and ``optimal_sparse_probe`` finds the provably best k-subset of a small pool.
"""
from monoscope.probing.probe import (
    Probe,
    binary_metrics,
    evaluate,
    fit_probe,
    random_rotation,
    shuffle_labels,
    split_by_sequence,
)
from monoscope.probing.select import (
    DEFAULT_KS,
    RANKERS,
    adaptive_l1_ratio,
    adaptive_thresholding,
    rank_features,
    sweep,
)
from monoscope.probing.osp import OSPResult, optimal_sparse_probe, optimal_sparse_probe_path

__all__ = [
    "DEFAULT_KS",
    "OSPResult",
    "Probe",
    "RANKERS",
    "adaptive_l1_ratio",
    "adaptive_thresholding",
    "binary_metrics",
    "evaluate",
    "fit_probe",
    "optimal_sparse_probe",
    "optimal_sparse_probe_path",
    "random_rotation",
    "rank_features",
    "shuffle_labels",
    "split_by_sequence",
    "sweep",
]
