"""Canonical hook points, the same names for every architecture, and the machinery to read or edit them.

    layers.{i}.resid_pre    input of block i (the residual stream before it)
    layers.{i}.attn_out     what the attention sub-block adds to the residual stream
    layers.{i}.mlp_neurons  the MLP's hidden activations feeding its output projection (act(gate)·up if gated)
    layers.{i}.mlp_out      what the MLP sub-block adds to the residual stream
    layers.{i}.resid_post   output of block i

For Gemma 2/3 the attention and MLP outputs pass through extra "post" RMSNorms before the residual add;
attn_out / mlp_out are taken after those norms, so resid_post = resid_pre + attn_out + mlp_out holds for
every family (the tests check this identity).

Reading and editing use PyTorch module hooks. ``capture`` stops the forward pass right after the deepest
hook it needs (no wasted layers, no unembedding); ``edit`` replaces an activation with fn(activation),
which SAE splicing and steering build on.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from monoscope.errors import MonoscopeError

KINDS = ("resid_pre", "attn_out", "mlp_neurons", "mlp_out", "resid_post")  # in forward order within a block


@dataclass(frozen=True)
class FamilySpec:
    """Where each canonical hook lives in one model family, as module paths relative to a block."""

    layers: str        # path of the ModuleList of blocks
    attn_out: str      # module whose output is attn_out
    mlp_out: str       # module whose output is mlp_out
    mlp_neurons: str   # module whose *input* is mlp_neurons
    final_norm: str    # the final norm before the unembedding (for logit effects)
    width_attr: str = "hidden_size"
    mlp_width_attr: str = "intermediate_size"


_LLAMA_LIKE = FamilySpec("model.layers", "self_attn", "mlp", "mlp.down_proj", "model.norm")
_GEMMA2_LIKE = FamilySpec("model.layers", "post_attention_layernorm", "post_feedforward_layernorm",
                          "mlp.down_proj", "model.norm")
FAMILIES: dict[str, FamilySpec] = {
    "gpt2": FamilySpec("transformer.h", "attn", "mlp", "mlp.c_proj", "transformer.ln_f",
                       width_attr="n_embd", mlp_width_attr="n_inner"),
    "gpt_neox": FamilySpec("gpt_neox.layers", "attention", "mlp", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
}

_NAME = re.compile(r"^layers\.(\d+)\.(" + "|".join(KINDS) + r")$")


@dataclass(frozen=True)
class HookPoint:
    name: str
    layer: int
    kind: str
    module: torch.nn.Module
    is_input: bool     # True: the module's first input; False: its (first) output
    width: int

    @property
    def order(self) -> tuple[int, int]:
        """Position in the forward pass, used to stop right after the deepest hook."""
        return self.layer, KINDS.index(self.kind)


def family_spec(model: torch.nn.Module) -> FamilySpec:
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise MonoscopeError(f"model family {model_type!r} has no hook table; supported families: "
                             f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def _widths(model: torch.nn.Module, spec: FamilySpec) -> tuple[int, int]:
    cfg = model.config
    d = getattr(cfg, spec.width_attr)
    d_mlp = getattr(cfg, spec.mlp_width_attr, None) or 4 * d  # GPT-2's n_inner=None means 4·d
    return d, d_mlp


def hook_points(model: torch.nn.Module) -> dict[str, HookPoint]:
    """Every canonical hook point of ``model`` in forward order."""
    spec = family_spec(model)
    blocks = model.get_submodule(spec.layers)
    d, d_mlp = _widths(model, spec)
    points: dict[str, HookPoint] = {}
    for i, block in enumerate(blocks):
        table = {
            "resid_pre": (block, True, d),
            "attn_out": (block.get_submodule(spec.attn_out), False, d),
            "mlp_neurons": (block.get_submodule(spec.mlp_neurons), True, d_mlp),
            "mlp_out": (block.get_submodule(spec.mlp_out), False, d),
            "resid_post": (block, False, d),
        }
        for kind in KINDS:
            module, is_input, width = table[kind]
            name = f"layers.{i}.{kind}"
            points[name] = HookPoint(name, i, kind, module, is_input, width)
    return points


def resolve(model: torch.nn.Module, name: str) -> HookPoint:
    """Look up one canonical hook name; an unknown name lists the valid ones."""
    points = hook_points(model)
    if name not in points:
        n = len(model.get_submodule(family_spec(model).layers))
        why = "" if _NAME.match(name) else " (names look like layers.{i}.{kind})"
        raise MonoscopeError(f"unknown hook {name!r}{why}; valid hooks are layers.{{0..{n - 1}}}."
                             f"{{{'|'.join(KINDS)}}}, e.g. layers.{n // 3}.resid_post")
    return points[name]


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, new):
    return (new,) + tuple(value[1:]) if isinstance(value, tuple) else new


def _register(point: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register ``fn`` on the activation of ``point``; a non-None return value replaces the activation."""
    if point.is_input:
        def pre_hook(module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new,) + tuple(args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(module, args, output):
        new = fn(_first(output))
        return None if new is None else _replace_first(output, new)
    return point.module.register_forward_hook(post_hook)


class _StopForward(Exception):
    """Raised inside the forward pass once the deepest requested activation is captured."""


@contextlib.contextmanager
def capture(model: torch.nn.Module, names: list[str] | tuple[str, ...], stop: bool = True
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the activations at ``names`` during forward passes run inside the block.

    With ``stop=True`` the forward pass is cut right after the deepest hook: call the model through
    ``run_until_captured`` (or catch nothing — the exception is swallowed at the end of the block).
    """
    points = [resolve(model, n) for n in names]
    deepest = max(points, key=lambda p: p.order)
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for p in points:
        def grab(t, p=p):
            acts[p.name] = t.detach()
            if stop and p is deepest:
                raise _StopForward
        handles.append(_register(p, grab))
    try:
        yield acts
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def run_with_capture(model: torch.nn.Module, names, input_ids: torch.Tensor, stop: bool = True, **kwargs
                     ) -> dict[str, torch.Tensor]:
    """One forward pass over ``input_ids`` that returns {hook name: activation [batch, seq, width]}."""
    with capture(model, names, stop=stop) as acts:
        try:
            model(input_ids=input_ids, use_cache=False, **kwargs)
        except _StopForward:
            pass
    return acts


@torch.no_grad()
def text_activations(lm, hook: str, texts) -> torch.Tensor:
    """[tokens, width]: the activations at ``hook`` of every token of ``texts`` (one forward pass each, the
    BOS position left out), for a LoadedModel ``lm``."""
    rows = []
    for text in texts:
        ids = lm.tokenizer(text, return_tensors="pt").input_ids.to(lm.device)
        skip = 1 if lm.bos_token_id is not None and ids.shape[1] > 1 and ids[0, 0].item() == lm.bos_token_id else 0
        rows.append(run_with_capture(lm.model, [hook], ids)[hook][0, skip:].float())
    return torch.cat(rows)


@contextlib.contextmanager
def edit(model: torch.nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the activation at hook ``name`` by ``fn(activation)`` for forward passes inside the block."""
    handle = _register(resolve(model, name), fn)
    try:
        yield
    finally:
        handle.remove()


def describe(model: torch.nn.Module) -> list[tuple[str, int]]:
    """(name, width) of every hook point, for ``monoscope hookpoints``."""
    return [(p.name, p.width) for p in hook_points(model).values()]
