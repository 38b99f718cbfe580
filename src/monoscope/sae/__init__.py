"""Sparse autoencoders: one module per architecture, a registry to build them by name, and file formats.

    from monoscope.sae import SAEConfig, build_sae, save_sae, load_sae
    sae = build_sae(SAEConfig("topk", d_in=640, d_sae=10240, k=32))
"""
from monoscope.sae.base import ARCHITECTURES, REGISTRY, SAE, SAEConfig, TrainOutput, build_sae, geometric_median
from monoscope.sae.relu import ReLUSAE
from monoscope.sae.topk import TopKSAE
from monoscope.sae.batchtopk import BatchTopKSAE
from monoscope.sae.gated import GatedSAE
from monoscope.sae.jumprelu import JumpReLUSAE
from monoscope.sae.matryoshka import MatryoshkaSAE
from monoscope.sae.io import load_sae, save_sae

__all__ = [
    "ARCHITECTURES", "REGISTRY", "SAE", "SAEConfig", "TrainOutput", "build_sae", "geometric_median",
    "ReLUSAE", "TopKSAE", "BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "MatryoshkaSAE", "load_sae", "save_sae",
]
