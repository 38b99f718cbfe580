"""The contract every SAE architecture follows, plus the pieces they share.

One class per architecture (relu.py, topk.py, ...) subclasses ``SAE`` and fills in ``training_forward``;
the trainer, evaluation, feature statistics and steering only ever use the methods defined here, so a
new architecture is one new module and one ``@register`` line.

Conventions:
- ``W_enc`` is [d_in, d_sae], ``W_dec`` is [d_sae, d_in]; x̂ = f·W_dec + b_dec.
- Pre-activations z = (x − b_dec)·W_enc + b_enc (the b_dec subtraction is skipped when
  ``cfg.apply_b_dec_to_input`` is false, as in Gemma Scope files).
- "mse" in every ``TrainOutput.terms`` is the sum over d, mean over tokens, so numbers from different
  architectures can be compared in one log. The TopK family optimises the *normalised* MSE
  (mse / Σ‖x − x̄‖², OpenAI's form) because its only other term, AuxK, is normalised the same way;
  ReLU, Gated and JumpReLU optimise the plain mse, which is the scale their λ values are quoted on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from monoscope.errors import MonoscopeError

# name -> class, filled by ``@register`` as the architecture modules are imported (see sae/__init__.py).
REGISTRY: dict[str, type["SAE"]] = {}


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE; saved inside cfg.json's metadata.

    Settings only some architectures read default to None and are filled from the architecture's
    ``defaults`` when the config is made, so each class owns its defaults and a saved config shows
    which settings its SAE actually uses.
    """

    architecture: str = field(metadata={"help": "relu | topk | batchtopk | gated | jumprelu | matryoshka"})
    d_in: int = field(metadata={"help": "width of the activations the SAE reads"})
    d_sae: int = field(metadata={"help": "number of latents (dictionary size)"})
    k: int | None = field(default=None, metadata={"help": "active latents per token (topk, batchtopk, matryoshka)"})
    l1_coefficient: float | None = field(default=None, metadata={
        "help": "λ of the decoder-norm-weighted L1 penalty (relu, gated), on normalised activations"})
    l0_coefficient: float | None = field(default=None, metadata={
        "help": "λ of the JumpReLU L0 penalty (or of the target-L0 penalty when target_l0 is set)"})
    target_l0: float | None = field(default=None, metadata={
        "help": "JumpReLU only: use λ·(L0/target − 1)² (Gemma Scope 2) to aim at this L0"})
    jumprelu_bandwidth: float | None = field(default=None, metadata={"help": "straight-through kernel width ε"})
    jumprelu_init_threshold: float | None = field(default=None, metadata={"help": "initial JumpReLU threshold θ"})
    aux_k: int | None = field(default=None, metadata={"help": "AuxK latents per token (default d_in // 2)"})
    aux_coefficient: float | None = field(default=None, metadata={"help": "weight α of the AuxK loss"})
    dead_tokens_threshold: int = field(default=10_000_000, metadata={
        "help": "a latent silent for this many training tokens counts as dead (AuxK)"})
    matryoshka_widths: tuple[int, ...] | None = field(default=None, metadata={
        "help": "nested prefix widths, last = d_sae (default d_sae/16, /8, /4, /2, d_sae)"})
    batchtopk_threshold_rate: float | None = field(default=None, metadata={
        "help": "EMA rate of the inference threshold of batchtopk / matryoshka"})
    decoder_init_norm: float | None = field(default=None, metadata={
        "help": "initial decoder row norm (default 0.1 for relu/gated, 1 for the unit-norm archs)"})
    apply_b_dec_to_input: bool = field(default=True, metadata={
        "help": "encode x − b_dec (false only for imported SAEs such as Gemma Scope)"})
    hook_name: str = field(default="", metadata={"help": "where in the model the SAE reads"})
    model_name: str = field(default="", metadata={"help": "model the SAE was trained on"})

    def __post_init__(self) -> None:
        cls = REGISTRY.get(self.architecture)
        for name, value in (cls.defaults.items() if cls is not None else ()):
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def aux_k_resolved(self) -> int:
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)

    @property
    def widths_resolved(self) -> tuple[int, ...]:
        if self.matryoshka_widths is not None:
            return tuple(int(w) for w in self.matryoshka_widths)
        ws = sorted({max(1, self.d_sae // div) for div in (16, 8, 4, 2, 1)})
        return tuple(ws)

    def validate(self) -> None:
        """Raise a MonoscopeError naming the first bad field and what would be right.

        The checks common to every SAE live here; each architecture adds its own in ``check_config``.
        """
        cls = REGISTRY.get(self.architecture)
        if cls is None:
            raise MonoscopeError(f"unknown SAE architecture {self.architecture!r}; "
                                 f"valid names are: {', '.join(REGISTRY)}")
        if self.d_in < 1 or self.d_sae < 1:
            raise MonoscopeError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        cls.check_config(self)


def require_non_negative(cfg: SAEConfig, name: str) -> None:
    """Raise unless ``cfg.<name>`` is a finite number ≥ 0 (penalty coefficients)."""
    v = getattr(cfg, name)
    if not (math.isfinite(v) and v >= 0):
        raise MonoscopeError(f"{name} must be a finite number ≥ 0, got {v}; a negative penalty rewards density")


@dataclass
class TrainOutput:
    """What one ``training_forward`` returns. ``loss`` carries the graph; ``terms`` are detached, for logs.

    Dense architectures fill ``f`` [N, d_sae]; the TopK family fills ``idx``/``vals`` [N, K] instead (latent
    ids and their activations, zeros where a slot is unused) so nothing dense is materialised; JumpReLU fills
    them as a CSR code list (``idx``/``vals`` [E], token t's entries at ``crow[t]:crow[t+1]``).
    """

    x_hat: Tensor
    loss: Tensor
    terms: dict[str, Tensor]
    l0: Tensor
    fired: Tensor
    f: Tensor | None = None
    idx: Tensor | None = None
    vals: Tensor | None = None
    crow: Tensor | None = None

    def dense_acts(self) -> Tensor:
        if self.f is not None:
            return self.f
        assert self.idx is not None and self.vals is not None
        n = self.x_hat.shape[0]
        out = torch.zeros(n, self.fired.shape[0], dtype=self.vals.dtype, device=self.vals.device)
        if self.crow is None:
            return out.scatter_add_(1, self.idx, self.vals.detach())
        return out.index_put_((csr_rows(self.crow), self.idx), self.vals.detach(), accumulate=True)


def register(name: str):
    """Class decorator: make an architecture buildable by name (and known to io, sweep, train, stats)."""
    def wrap(cls: type[SAE]) -> type[SAE]:
        if not cls.saelens_architecture or not cls.sweep_knobs:
            raise TypeError(f"SAE architecture {name!r} must set saelens_architecture and sweep_knobs")
        if name in REGISTRY:
            raise TypeError(f"SAE architecture {name!r} is registered twice")
        cls.architecture = name
        REGISTRY[name] = cls
        return cls
    return wrap


def build_sae(cfg: SAEConfig) -> "SAE":
    """Construct a freshly initialised SAE of ``cfg.architecture``."""
    cfg.validate()
    return REGISTRY[cfg.architecture](cfg)


# ----------------------------------------------------------------------------------------------------------
# Shared maths

def sum_sq(err: Tensor) -> Tensor:
    """Σ_d err², mean over tokens — the MSE every log reports."""
    return err.pow(2).sum(-1).mean()


def total_variance(x: Tensor) -> Tensor:
    """Σ_d (x − x̄)², mean over tokens: the denominator of the normalised MSE (FVU)."""
    return (x - x.mean(0, keepdim=True)).pow(2).sum(-1).mean().clamp_min(1e-12)


@torch.no_grad()
def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6, max_points: int = 20_000) -> Tensor:
    """Weiszfeld iterations from the mean; a robust centre used to initialise b_dec."""
    pts = points.reshape(-1, points.shape[-1]).double()
    if pts.shape[0] == 0:
        raise MonoscopeError("cannot initialise b_dec from an empty sample; pass at least one activation")
    if pts.shape[0] > max_points:
        gen = torch.Generator().manual_seed(0)
        pts = pts[torch.randperm(pts.shape[0], generator=gen)[:max_points].to(pts.device)]
    y = pts.mean(0)
    for _ in range(iters):
        w = 1.0 / (pts - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * pts).sum(0) / w.sum()
        moved = (y_new - y).norm()
        y = y_new
        if moved <= tol * max(1.0, y.norm().item()):
            break
    return y.to(points.dtype)


def _flatten(x: Tensor, d: int) -> tuple[Tensor, tuple[int, ...]]:
    if x.shape[-1] != d:
        raise MonoscopeError(f"expected activations with last dimension {d}, got shape {tuple(x.shape)}; "
                             f"is this the hook the SAE was trained on?")
    return x.reshape(-1, d), tuple(x.shape[:-1])


# ----------------------------------------------------------------------------------------------------------

class SAE(nn.Module):
    """Base SAE: parameters, dense encode/decode and the hooks the trainer calls around each step.

    What an architecture declares about itself (class attributes, read by the rest of the package):

    - ``unit_norm_decoder``: decoder rows kept at norm 1 (the gradient component along each row is removed
      before the step and rows are renormalised after it);
    - ``median_init``: b_dec starts at the geometric median of a data sample;
    - ``default_decoder_norm``: initial decoder row norm when ``cfg.decoder_init_norm`` is unset;
    - ``saelens_architecture``: the SAELens architecture it is saved as (its inference form), and
      ``saelens_exact``: whether that form is the whole model, so a plain SAELens folder of that
      architecture loads as this class (false for BatchTopK/Matryoshka, saved as JumpReLU);
    - ``sweep_knobs``: the SAEConfig fields a sweep varies, in order of preference (the first one the
      sweep has values for is used);
    - ``has_sparse_encode``: ``encode_sparse(x)`` returns (vals, idx) [N, k] with a fixed k per token;
    - ``defaults``: values of the SAEConfig settings it reads, used where a config leaves them None.

    and ``check_config`` validates the settings it reads.
    """

    architecture: ClassVar[str] = ""
    unit_norm_decoder: ClassVar[bool] = False
    median_init: ClassVar[bool] = False
    default_decoder_norm: ClassVar[float] = 1.0
    saelens_architecture: ClassVar[str] = ""
    saelens_exact: ClassVar[bool] = True
    sweep_knobs: ClassVar[tuple[str, ...]] = ()
    has_sparse_encode: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Raise a MonoscopeError for a bad architecture-specific setting (d_in/d_sae are already checked)."""

    @classmethod
    def saelens_fields(cls, cfg: SAEConfig) -> dict[str, Any]:
        """Architecture-specific keys of the SAELens cfg.json written for this SAE."""
        return {}

    @classmethod
    def config_from_saelens(cls, raw: dict[str, Any], where: str) -> dict[str, Any]:
        """Architecture-specific SAEConfig settings read from a plain SAELens cfg.json."""
        return {}

    def after_saelens_load(self, raw: dict[str, Any]) -> None:
        """Adjust weights just loaded from a plain SAELens folder (e.g. fold a SAELens-only option in)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = dataclasses.replace(cfg)  # own copy: fold_input_scale may adjust it
        d, m = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d, m))
        self.W_dec = nn.Parameter(torch.empty(m, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.reset_parameters()

    # -- initialisation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random decoder rows of a fixed norm and W_enc = W_decᵀ (Anthropic April 2024; OpenAI TopK)."""
        norm = self.cfg.decoder_init_norm if self.cfg.decoder_init_norm is not None else self.default_decoder_norm
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in)
        w *= norm / w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.t())

    @torch.no_grad()
    def init_from_data(self, sample: Tensor) -> None:
        """b_dec = geometric median of ``sample`` for architectures that use it; a no-op otherwise."""
        if self.median_init:
            self.b_dec.copy_(geometric_median(sample.to(self.b_dec.device, torch.float32)))

    # -- inference ----------------------------------------------------------------------------------------
    def _center(self, x: Tensor) -> Tensor:
        x = x.to(self.W_enc.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: Tensor) -> Tensor:
        """z = (x − b_dec)·W_enc + b_enc for [..., d_in] input."""
        flat, lead = _flatten(x, self.cfg.d_in)
        z = torch.addmm(self.b_enc, self._center(flat), self.W_enc)
        return z.reshape(*lead, self.cfg.d_sae)

    def encode(self, x: Tensor) -> Tensor:
        """Inference activations f [..., d_sae]."""
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        """x̂ = f·W_dec + b_dec for [..., d_sae] activations."""
        flat, lead = _flatten(f, self.cfg.d_sae)
        return torch.addmm(self.b_dec, flat.to(self.W_dec.dtype), self.W_dec).reshape(*lead, self.cfg.d_in)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # -- training -----------------------------------------------------------------------------------------
    def training_forward(self, x: Tensor, *, dead_mask: Tensor | None = None,
                         sparsity_scale: float = 1.0) -> TrainOutput:
        raise NotImplementedError

    @torch.no_grad()
    def before_step(self) -> None:
        """Unit-norm archs: drop the part of each decoder-row gradient that would change the row's norm."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            g = self.W_dec.grad
            g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def after_step(self) -> None:
        """Unit-norm archs: put decoder rows back on the unit sphere."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def calibrate(self, sample: Tensor) -> None:
        """After training, on a fresh sample of the training data (in training units): set what inference
        needs beyond the weights. A no-op unless an architecture's inference differs from its training."""

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        """Make an SAE trained on s·x work on raw x: x̂(x) = x̂_trained(s·x)/s and f(x) = f_trained(s·x)/s.

        Scaling every bias and threshold by 1/s divides all pre-activations by s; every activation
        function here is positively homogeneous (ReLU, TopK order, JumpReLU with θ/s, the gate sign), so
        f is divided by s and, with W_dec unchanged, x̂ − b_dec too. Keeping W_dec fixed keeps unit-norm
        decoders unit-norm, so f_i is the size of latent i's contribution in raw activation units.
        """
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise MonoscopeError(f"input scale must be a finite positive number, got {s!r}")
        for name in self._activation_unit_tensors():
            getattr(self, name).div_(s)

    def _activation_unit_tensors(self) -> tuple[str, ...]:
        """Parameters/buffers measured in activation units (divided by s when folding an input scale)."""
        return ("b_dec", "b_enc")

    # -- helpers ------------------------------------------------------------------------------------------
    def extra_tensors(self) -> dict[str, Tensor]:
        """Tensors saved beside W_enc/W_dec/b_dec, by their SAELens names."""
        return {"b_enc": self.b_enc}

    def config_dict(self) -> dict:
        return json_ready(dataclasses.asdict(self.cfg))

    def content_hash(self) -> str:
        """16 hex digits of sha256 over the config and every tensor, whatever file format they came from:
        the key of everything computed from this SAE."""
        h = hashlib.sha256(json.dumps(self.config_dict(), sort_keys=True, default=str).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, arch={self.architecture!r})"


def json_ready(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def csr_crow(rows: Tensor, n: int) -> Tensor:
    """CSR row pointers [n+1] of entries whose row ids are ``rows`` (grouped by row): the inverse of csr_rows."""
    crow = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=n), 0, out=crow[1:])
    return crow


def csr_rows(crow: Tensor) -> Tensor:
    """The token of each entry of a CSR code list with row pointers ``crow`` [N+1]."""
    n = crow.numel() - 1
    return torch.repeat_interleave(torch.arange(n, device=crow.device), crow.diff(), output_size=int(crow[-1]))


def dense_fired(f: Tensor) -> Tensor:
    return (f > 0).any(0)
