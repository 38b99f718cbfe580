"""Where the trainer's activations come from: an activation store, or a synthetic model's endless stream.

Both give the trainer the same few things (``ActivationStore`` is the reference): ``model``, ``num_rows``,
``hook(name)``, ``d(hook)``, ``content_hash()``, ``check_finite(hook)``, ``sample_rows(hook, n, seed)``,
``batches(hook, batch_size, ..., start_batch=...)`` and ``provenance(relative_to)``.

A synthetic batch is a pure function of (seed, epoch, batch index, rank), so a run killed at any step and
started again draws exactly the batches an uninterrupted run would, with no generator state to save.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from monoscope.errors import MonoscopeError
from monoscope.synth.model import SyntheticModel, generator_for, open_model

PREFIX = "synth:"
HOOK = "synthetic"
_EVAL_STREAM = 1  # sample streams: 0 training, 1 evaluation (never overlap)


class SyntheticSource:
    """Activations drawn on the fly from a synthetic model (monoscope.synth.model)."""

    num_rows = 2 ** 40  # endless: every step draws fresh samples
    meta: dict = {}

    def __init__(self, spec: str, model: SyntheticModel | None = None):
        self.spec = spec
        self.synthetic = model if model is not None else open_model(spec)
        self.model = f"{PREFIX}{spec}"
        self.model_fingerprint = self.synthetic.content_hash()

    def hook(self, hook: str | None = None) -> str:
        if hook not in (None, HOOK):
            raise MonoscopeError(f"a synthetic source has one hook, {HOOK!r}; got {hook!r} (drop --hook)")
        return HOOK

    def d(self, hook: str | None = None) -> int:
        return self.synthetic.hidden_dim

    def content_hash(self) -> str:
        return self.model_fingerprint

    def check_finite(self, hook: str | None = None) -> None:
        """Generated samples are finite by construction."""

    def sample_rows(self, hook: str, n: int, seed: int) -> torch.Tensor:
        return self.synthetic.sample(n, generator_for(seed, 7))

    def eval_batches(self, n: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fresh (hidden, true feature activations) batches from a stream training never draws from."""
        for i, start in enumerate(range(0, n, batch_size)):
            yield self.synthetic.sample(min(batch_size, n - start), generator_for(seed, _EVAL_STREAM, i),
                                        with_features=True)

    def batches(self, hook: str | None = None, batch_size: int = 4096, *, seed: int = 0, epoch: int = 0,
                rank: int = 0, start_batch: int = 0, device=None, **_ignored) -> Iterator[torch.Tensor]:
        """Batches start_batch, start_batch + 1, ... of this (seed, epoch, rank); shuffling and buffers do not
        apply (every sample is fresh)."""
        b = start_batch
        while True:
            x = self.synthetic.sample(batch_size, generator_for(seed, 0, epoch, b, rank))
            yield x.to(device) if device is not None else x
            b += 1

    def provenance(self, relative_to: Path) -> dict:
        return {"source": self.model, "model": self.model, "model_fingerprint": self.model_fingerprint,
                "rows": None}


def open_source(spec: str | Path):
    """``synth:NAME`` or ``synth:FOLDER`` → a SyntheticSource; anything else is an activation store folder."""
    from monoscope.store import ActivationStore

    if isinstance(spec, str) and spec.startswith(PREFIX):
        return SyntheticSource(spec[len(PREFIX):])
    return ActivationStore(spec)
