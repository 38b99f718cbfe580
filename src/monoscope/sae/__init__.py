"""Sparse autoencoders: one module per architecture, a registry to build them by name, and file formats.

    from monoscope.sae import SAEConfig, build_sae, save_sae, load_sae
    sae = build_sae(SAEConfig("topk", d_in=640, d_sae=10240, k=32))

How to add an architecture — one module plus one registration:

1. write ``sae/<name>.py`` with a subclass of ``SAE`` (base.py) decorated ``@register("<name>")``; it fills in
   ``encode`` and ``training_forward`` and declares what the rest of the package asks of it: the class
   attributes ``saelens_architecture`` (how io.py saves it), ``sweep_knobs`` (what sweep.py varies),
   ``has_sparse_encode`` (the fast path of feature statistics), ``default_decoder_norm`` /
   ``unit_norm_decoder`` / ``median_init`` (initialisation and training), and ``check_config`` for the
   settings it reads (train.py and build_sae call it);
2. import the module below. REGISTRY, ARCHITECTURES, io.py, sweep.py and train.py then know it.
"""
from monoscope.sae.base import REGISTRY, SAE, SAEConfig, TrainOutput, build_sae, geometric_median
from monoscope.sae.relu import ReLUSAE
from monoscope.sae.topk import TopKSAE
from monoscope.sae.batchtopk import BatchTopKSAE
from monoscope.sae.gated import GatedSAE
from monoscope.sae.jumprelu import JumpReLUSAE
from monoscope.sae.matryoshka import MatryoshkaSAE
from monoscope.sae.io import load_sae, save_sae

ARCHITECTURES: tuple[str, ...] = tuple(REGISTRY)  # registration order

__all__ = [
    "ARCHITECTURES", "REGISTRY", "SAE", "SAEConfig", "TrainOutput", "build_sae", "geometric_median",
    "ReLUSAE", "TopKSAE", "BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "MatryoshkaSAE", "load_sae", "save_sae",
]
