"""Steer a model with SAE features, compare default and steered generations, and measure the effect.

Modes (REFERENCE.md §4), with d_i latent i's direction in the hook's raw activation space
(d_i = decode(e_i) − decode(0), so any normalisation folded into the SAE is respected):

- clamp:  x ← x + (v − f_i(x))·d_i — only latent i's contribution changes, the SAE's error term
  (x − x̂) is kept, so the model sees its own activation apart from that one feature;
- add:    x ← x + v·d_i at every position;
- ablate: clamp to 0.

Several interventions act at once; the clamps all use f(x) of the unsteered activation. Position 0 of
a multi-token forward pass is the BOS token (prompts always start with it): it is left alone, because
SAEs are trained without BOS and its huge norm makes f(BOS) meaningless.
"""
from __future__ import annotations

import contextlib
import math
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch

from monoscope.errors import MonoscopeError

MODES = ("clamp", "add", "ablate")


@dataclass(frozen=True)
class Intervention:
    """Set (clamp), shift (add) or zero (ablate) latent ``feature``."""

    feature: int
    value: float = 0.0
    mode: str = "clamp"


def _check(lm, sae, interventions: Sequence[Intervention]) -> list[Intervention]:
    from monoscope.selfcheck import sae_for_model

    sae_for_model(sae, lm)
    out, seen = [], set()
    for iv in interventions:
        if not isinstance(iv, Intervention):
            iv = Intervention(*iv) if isinstance(iv, (tuple, list)) else Intervention(**iv)
        if iv.mode not in MODES:
            raise MonoscopeError(f"unknown steering mode {iv.mode!r}; use one of {', '.join(MODES)}")
        if not 0 <= int(iv.feature) < sae.cfg.d_sae:
            raise MonoscopeError(f"feature {iv.feature} is out of range: this SAE has latents 0..{sae.cfg.d_sae - 1}")
        if iv.feature in seen:
            raise MonoscopeError(f"feature {iv.feature} is steered twice; give one intervention per feature")
        if not math.isfinite(float(iv.value)):
            raise MonoscopeError(f"steering value for feature {iv.feature} must be finite, got {iv.value}")
        seen.add(iv.feature)
        out.append(Intervention(int(iv.feature), 0.0 if iv.mode == "ablate" else float(iv.value), iv.mode))
    if not out:
        raise MonoscopeError("no interventions given; pass at least one Intervention(feature, value, mode)")
    return out


def directions(sae, features: list[int]) -> torch.Tensor:
    """d_i = decode(e_i) − decode(0) for the chosen latents [n, d_in] (raw activation space)."""
    p = next(sae.parameters())
    eye = torch.zeros(len(features) + 1, sae.cfg.d_sae, dtype=p.dtype, device=p.device)
    eye[torch.arange(1, len(features) + 1), torch.tensor(features)] = 1.0
    with torch.no_grad():
        out = sae.decode(eye)
    return out[1:] - out[:1]


@contextlib.contextmanager
def steer(lm, sae, interventions: Sequence[Intervention], skip_bos: bool = True) -> Iterator[None]:
    """Apply ``interventions`` at the SAE's hook for every forward pass of ``lm.model`` inside the block."""
    from monoscope.hookpoints import edit

    ivs = _check(lm, sae, interventions)
    feats = [iv.feature for iv in ivs]
    dirs = directions(sae, feats)
    values = torch.tensor([iv.value for iv in ivs], dtype=dirs.dtype, device=dirs.device)
    is_clamp = torch.tensor([iv.mode in ("clamp", "ablate") for iv in ivs], device=dirs.device)
    any_clamp = bool(is_clamp.any())
    idx = torch.tensor(feats, device=dirs.device)

    def fn(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(dirs.dtype)
        coef = values.expand(flat.shape[0], -1)
        if any_clamp:
            with torch.no_grad():
                f = sae.encode(flat)[:, idx]
            coef = torch.where(is_clamp, values - f, values)
        new = (flat + coef @ dirs).to(x.dtype).reshape(x.shape)
        if skip_bos and x.dim() == 3 and x.shape[1] > 1:
            new[:, 0] = x[:, 0]
        return new

    with edit(lm.model, sae.cfg.hook_name, fn):
        yield


@contextlib.contextmanager
def add_vector(lm, hook: str, vector: torch.Tensor, skip_bos: bool = True) -> Iterator[None]:
    """Add ``vector`` [d] to the activation at ``hook`` at every position (BOS left alone) inside the block:
    steering by a direction that is not an SAE latent, such as a difference of means."""
    from monoscope.hookpoints import edit

    def fn(x: torch.Tensor) -> torch.Tensor:
        new = x + vector.to(x.dtype)
        if skip_bos and x.dim() == 3 and x.shape[1] > 1:
            new[:, 0] = x[:, 0]
        return new

    with edit(lm.model, hook, fn):
        yield


# ---------------------------------------------------------------------------------------------- generation

def _prompt_ids(lm, prompt: str) -> torch.Tensor:
    """Token ids [1, T] of ``prompt``, always starting with BOS (as every stored context does)."""
    ids = lm.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    bos = lm.tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + list(ids)
    if not ids:
        raise MonoscopeError("the prompt is empty and the tokenizer has no BOS token; give some text")
    return torch.tensor([ids], device=lm.device)


@torch.no_grad()
def _sample(lm, ids: torch.Tensor, n: int, max_new_tokens: int, temperature: float, seed: int) -> torch.Tensor:
    """``n`` continuations [n, max_new_tokens] of ``ids`` with a seeded sampler (temperature 0 = greedy).

    Only the last position's logits are computed (the vocabulary projection is most of a small model's
    cost), and tokens are drawn by inverting the cumulative distribution with one uniform number per row:
    the same distribution as ``torch.multinomial``, which takes longer than the forward pass on a
    262k-token vocabulary.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cur, past, out = ids.repeat(n, 1), None, []
    key = _cache_argument(lm.model)
    for _ in range(max_new_tokens):
        o = lm.model(input_ids=cur, use_cache=True, logits_to_keep=1, **({key: past} if past is not None else {}))
        past = o["cache"] if key == "cache" else o.past_key_values
        logits = o.logits[:, -1].float().cpu()
        nxt = logits.argmax(-1, keepdim=True) if temperature <= 0 else _draw(logits, temperature, gen)
        out.append(nxt)
        cur = nxt.to(ids.device)
    return torch.cat(out, 1) if out else torch.zeros(n, 0, dtype=torch.long)


def _cache_argument(model) -> str:
    """The name under which this transformers version takes the KV cache ('cache' since 5.2x, before that
    'past_key_values', which newer versions still accept with a deprecation warning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _draw(logits: torch.Tensor, temperature: float, gen: torch.Generator, block: int = 512) -> torch.Tensor:
    """One token per row [n, 1] from softmax(logits / temperature): the first index whose cumulative
    probability exceeds a uniform draw (a zero-probability token is never chosen). ``logits`` is overwritten.

    Exact, in two levels, because a running sum over a 262k-token vocabulary is slow: unnormalised weights
    (computed in place: a fresh [n, vocab] buffer per step costs more than the arithmetic), their sums per
    block of ``block`` tokens, the block the draw falls in, then the token inside that block.
    """
    w = logits if logits.is_contiguous() else logits.contiguous()
    w.sub_(w.amax(-1, keepdim=True)).mul_(1.0 / temperature).exp_()
    n, vocab = w.shape
    pad = (-vocab) % block
    blocks = (torch.nn.functional.pad(w, (0, pad)) if pad else w).view(n, -1, block)
    mass = blocks.sum(-1)  # [n, vocab / block]
    cdf = mass.cumsum(-1)
    u = torch.rand(n, 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    b = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # a block of positive mass
    inner = blocks[torch.arange(n), b[:, 0]].cumsum(-1)  # [n, block]
    rest = (u - cdf.gather(-1, b) + mass.gather(-1, b)).clamp_(min=0)
    rest = torch.minimum(rest, inner[:, -1:] * (1 - 1e-6))  # rounding must not step past the block's last token
    return (b * block + torch.searchsorted(inner, rest, right=True)).clamp_(max=vocab - 1)


def _decode(lm, new: torch.Tensor) -> list[str]:
    eos = lm.tokenizer.eos_token_id
    texts = []
    for row in new.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(lm.tokenizer.decode(row, skip_special_tokens=True))
    return texts


def continuations(lm, prompt: str, n: int, max_new_tokens: int, temperature: float = 0.7, seed: int = 0) -> list[str]:
    """``n`` sampled continuations of ``prompt`` as text (whatever steering is active applies)."""
    _check_gen(max_new_tokens, n, temperature)
    return _decode(lm, _sample(lm, _prompt_ids(lm, prompt), n, max_new_tokens, temperature, seed))


def _check_gen(max_new_tokens: int, n_samples: int, temperature: float) -> None:
    if max_new_tokens < 1 or n_samples < 1:
        raise MonoscopeError(f"max_new_tokens and n_samples must be at least 1 (got {max_new_tokens}, {n_samples})")
    if not math.isfinite(temperature) or temperature < 0:
        raise MonoscopeError(f"temperature must be ≥ 0 (0 = greedy), got {temperature}")


def generate_side_by_side(lm, sae, prompt: str, interventions: Sequence[Intervention], max_new_tokens: int = 40,
                          n_samples: int = 1, seed: int = 0, temperature: float = 0.7) -> list[dict[str, str]]:
    """Default and steered continuations of ``prompt`` drawn with the same seed, sample by sample."""
    _check_gen(max_new_tokens, n_samples, temperature)
    ivs = _check(lm, sae, interventions)
    ids = _prompt_ids(lm, prompt)
    default = _decode(lm, _sample(lm, ids, n_samples, max_new_tokens, temperature, seed))
    with steer(lm, sae, ivs):
        steered = _decode(lm, _sample(lm, ids, n_samples, max_new_tokens, temperature, seed))
    return [{"default": d, "steered": s} for d, s in zip(default, steered)]


# ---------------------------------------------------------------------------------------------- measurement

@torch.no_grad()
def _features_on_generated(lm, sae, ids: torch.Tensor, new: torch.Tensor, features: Sequence[int],
                           probe: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Mean activation over the generated tokens of row r's feature ``features[r]``, re-encoded without
    steering (the forward pass stops at the SAE's hook); with ``probe`` (hook activations [n, d] -> scores
    [n]), also each row's mean probe score over its generated tokens: (activations, scores or None)."""
    from monoscope.hookpoints import run_with_capture

    full = torch.cat([ids.repeat(new.shape[0], 1), new.to(ids.device)], 1)
    acts = run_with_capture(lm.model, [sae.cfg.hook_name], full)[sae.cfg.hook_name]
    gen = acts[:, ids.shape[1]:]
    flat = gen.reshape(-1, gen.shape[-1])
    f = sae.encode(flat.to(next(sae.parameters()).dtype)).reshape(*new.shape, -1)
    idx = torch.as_tensor(list(features), device=f.device)
    feature = f.gather(-1, idx[:, None, None].expand(-1, new.shape[1], 1))[..., 0].mean(1).float().cpu().numpy()
    if probe is None:
        return feature, None
    return feature, probe(flat.float()).reshape(new.shape).mean(1).float().cpu().numpy()


_WORD = re.compile(r"[^\W\d_]+")


def words(text: str) -> list[str]:
    """Lower-cased runs of letters: keyword matching works on whole words, so 'car' is not found in 'scare'."""
    return _WORD.findall(text.lower())


def mentions(text: str, keywords: Sequence[str]) -> bool:
    """Whether ``text`` has a word equal to a keyword, or starting with one of 5+ letters ('korea' matches
    'korean'): inflections count, while short keywords cannot hide inside longer words."""
    keys = {k.lower() for k in keywords}
    long = tuple(k for k in keys if len(k) >= 5)
    return any(w in keys or w.startswith(long) for w in words(text)) if keys else False


def distinct_share(new: torch.Tensor) -> np.ndarray:
    """Share of distinct tokens in each generated row [n, T]: about 0.8 for ordinary text, low when steering
    pushes the model into loops ('of the of the'), so degenerate generations are visible in the numbers."""
    return np.array([len(set(row)) / max(1, len(row)) for row in new.tolist()], dtype=float)


def _summary(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(x.mean()), "se": float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")}


def steering_effect(lm, sae, feature: int, value: float, prompts: Sequence[str], *, mode: str = "clamp",
                    n_samples: int = 20, max_new_tokens: int = 40, temperature: float = 0.7, seed: int = 0,
                    keywords: Sequence[str] | None = None, n_boot: int = 1000,
                    others: dict[str, Callable[[], ContextManager]] | None = None,
                    probe: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Does steering feature ``feature`` make the generations express it?

    For each prompt, ``n_samples`` default and steered continuations are drawn (same seeds). Each
    continuation is fed back unsteered and encoded by the SAE; the score is the feature's mean activation
    over the generated tokens. Returns means with standard errors per arm, the steered − default
    difference with a bootstrap 95% interval, the share of distinct tokens per continuation (readability:
    steering too hard makes text loop), and, if ``keywords`` are given, the share of continuations that
    mention one (whole words, see ``mentions``) with its standard error and ``keyword_p_value``.
    ``others``: more steered arms by name, as context manager factories (e.g. ``add_vector`` of a baseline
    direction), on the same prompts and seeds, each compared with the one default arm: ``result[name]`` holds
    its summary plus its own ``difference`` and ``keyword_p_value``; the feature's activation on the text
    still measures the concept.
    ``probe``: a concept probe on the hook's activations ([n, d] -> scores in [0, 1]), a second judge of the
    text beside the feature: each arm gets ``concept_probe`` (mean score over the generated tokens) and each
    comparison ``probe_difference``.
    """
    if n_samples < 2:
        raise MonoscopeError(f"n_samples must be at least 2 for a standard error (20 or more is advised), got {n_samples}")
    if isinstance(prompts, str) or not prompts:
        raise MonoscopeError("prompts must be a non-empty list of strings")
    _check_gen(max_new_tokens, n_samples, temperature)
    ivs = _check(lm, sae, [Intervention(feature, value, mode)])
    if taken := set(others or {}) & RESULT_KEYS:
        raise MonoscopeError(f"steering arm names {sorted(taken)} are taken by the result; name the arms otherwise")
    makers = {"default": contextlib.nullcontext, "steered": lambda: steer(lm, sae, ivs), **(others or {})}
    arms: dict[str, dict[str, list]] = {arm: {"act": [], "probe": [], "text": [], "distinct": []} for arm in makers}
    for p_i, prompt in enumerate(prompts):
        ids = _prompt_ids(lm, prompt)
        for arm, make in makers.items():
            with make():
                new = _sample(lm, ids, n_samples, max_new_tokens, temperature, seed + p_i)
            act, scores = _features_on_generated(lm, sae, ids, new, [ivs[0].feature] * len(new), probe)
            arms[arm]["act"].append(act)
            arms[arm]["probe"] += [] if scores is None else [scores]
            arms[arm]["text"] += _decode(lm, new)
            arms[arm]["distinct"].append(distinct_share(new))
    result: dict = {"feature": ivs[0].feature, "value": ivs[0].value, "mode": ivs[0].mode,
                    "keywords": list(keywords or []),
                    "n_prompts": len(prompts), "n_samples": n_samples, "max_new_tokens": max_new_tokens,
                    "temperature": temperature, "seed": seed}
    for arm, raw in arms.items():
        result[arm] = _arm_summary(raw, keywords)
    for arm in [a for a in arms if a != "default"]:
        into = result if arm == "steered" else result[arm]
        into["difference"] = _difference(result["default"]["_acts"], result[arm]["_acts"], n_boot, seed)
        if probe is not None:
            into["probe_difference"] = _difference(result["default"]["_probe"], result[arm]["_probe"], n_boot, seed)
        if keywords:
            into["keyword_p_value"] = keyword_p_value(result["default"]["keyword_rate"], result[arm]["keyword_rate"])
    for arm in arms:
        del result[arm]["_acts"], result[arm]["_probe"]
    return result


RESULT_KEYS = frozenset({"default", "steered", "feature", "value", "mode", "keywords", "n_prompts", "n_samples",
                         "max_new_tokens", "temperature", "seed", "difference", "probe_difference", "keyword_p_value"})


def _arm_summary(raw: dict[str, list], keywords: Sequence[str] | None) -> dict:
    """One arm's means with standard errors, keyword rate, concept-probe score, first examples and texts
    (``_acts``, ``_probe``: the raw values, for the comparison)."""
    acts = np.concatenate(raw["act"])
    out = {"mean_activation": _summary(acts), "distinct_tokens": _summary(np.concatenate(raw["distinct"]))}
    scores = np.concatenate(raw["probe"]) if raw["probe"] else None
    if scores is not None:
        out["concept_probe"] = _summary(scores)
    if keywords:
        hits = np.array([mentions(t, keywords) for t in raw["text"]], dtype=float)
        p = float(hits.mean())
        out["keyword_rate"] = {"mean": p, "se": math.sqrt(p * (1 - p) / len(hits)), "hits": int(hits.sum()),
                               "n": len(hits)}
    return {**out, "examples": raw["text"][:3], "texts": raw["text"], "_acts": acts, "_probe": scores}


def _difference(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean of ``b`` minus mean of ``a`` with a bootstrap 95 % interval."""
    rng = np.random.default_rng(seed)
    boots = np.array([rng.choice(b, len(b)).mean() - rng.choice(a, len(a)).mean() for _ in range(n_boot)])
    return {"mean": float(b.mean() - a.mean()),
            "ci95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]}


def keyword_p_value(default: dict, steered: dict) -> float:
    """One-sided Fisher exact test that the steered keyword rate is higher than the default one
    ({'hits', 'n'} per arm): exact for the small counts of a demo, where a normal approximation is not."""
    from scipy.stats import fisher_exact

    table = [[steered["hits"], steered["n"] - steered["hits"]], [default["hits"], default["n"] - default["hits"]]]
    return float(fisher_exact(table, alternative="greater")[1])


@torch.no_grad()
def screen_features(lm, sae, features: Sequence[int], values: Sequence[float], keywords: Sequence[Sequence[str]],
                    prompts: Sequence[str], *, max_new_tokens: int = 10, temperature: float = 0.7, seed: int = 0,
                    batch: int = 128) -> list[dict]:
    """A cheap first look at many candidate features: which ones, clamped, make the text mention their keywords?

    One continuation per (feature, prompt), with every feature in its own row of one batch (row r clamps
    ``features[r]`` to ``values[r]``), so a hundred candidates cost about one generation. Returns, per
    feature, the share of its continuations that mention one of its keywords and their distinct-token share.
    Too few samples to report: use it to choose the feature, then measure that one with ``steering_effect``
    on other seeds.
    """
    from monoscope.hookpoints import edit

    if not (len(features) == len(values) == len(keywords)):
        raise MonoscopeError("screen_features needs one value and one keyword list per feature")
    _check(lm, sae, [Intervention(0, 0.0)])
    out = {int(f): {"feature": int(f), "hits": 0, "n": 0, "distinct": [], "act": []} for f in features}
    for start in range(0, len(features), batch):
        feats = [int(f) for f in features[start:start + batch]]
        dirs = directions(sae, feats)
        vals = torch.tensor([float(v) for v in values[start:start + batch]], dtype=dirs.dtype, device=dirs.device)
        idx = torch.tensor(feats, device=dirs.device)

        def fn(x: torch.Tensor) -> torch.Tensor:
            flat = x.to(dirs.dtype)
            f = sae.encode(flat.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
            cur = f.gather(-1, idx[:, None].expand(-1, x.shape[1])[..., None])[..., 0]  # [rows, T]
            new = flat + (vals[:, None] - cur)[..., None] * dirs[:, None, :]
            if x.shape[1] > 1:
                new[:, 0] = flat[:, 0]  # BOS left alone, as in ``steer``
            return new.to(x.dtype)

        for p_i, prompt in enumerate(prompts):
            ids = _prompt_ids(lm, prompt)
            with edit(lm.model, sae.cfg.hook_name, fn):
                new = _sample(lm, ids, len(feats), max_new_tokens, temperature, seed + p_i)
            acts, _ = _features_on_generated(lm, sae, ids, new, feats)
            for f, kws, text, dist, act in zip(feats, keywords[start:start + batch], _decode(lm, new),
                                               distinct_share(new), acts):
                out[f]["hits"] += int(mentions(text, kws))
                out[f]["n"] += 1
                out[f]["distinct"].append(float(dist))
                out[f]["act"].append(float(act))
    rows = []
    for rec in out.values():
        rows.append({"feature": rec["feature"], "hits": rec["hits"], "n": rec["n"],
                     "keyword_rate": rec["hits"] / max(1, rec["n"]),
                     "distinct_tokens": float(np.mean(rec["distinct"])) if rec["distinct"] else float("nan"),
                     "activation": float(np.mean(rec["act"])) if rec["act"] else float("nan")})
    return rows


# ---------------------------------------------------------------------------------------------- CLI

def _pair_up(features: list[int], values: list[float], modes: list[str]) -> list[Intervention]:
    """--feature/--value/--mode lists: one value (or mode) applies to every feature, else one each."""
    def spread(items, default, what):
        if not items:
            return [default] * len(features)
        if len(items) == 1:
            return items * len(features)
        if len(items) != len(features):
            raise MonoscopeError(f"give one --{what} for all features or one per --feature "
                                 f"({len(features)} features, {len(items)} {what}s)")
        return items
    vals, mds = spread(values, 0.0, "value"), spread(modes, "clamp", "mode")
    return [Intervention(f, v, m) for f, v, m in zip(features, vals, mds)]


def print_side_by_side(pairs: list[dict[str, str]], prompt: str, width: int | None = None) -> None:
    width = width or shutil.get_terminal_size((120, 20)).columns
    col = max(20, (width - 3) // 2)
    print(f"prompt: {prompt}")
    for i, pair in enumerate(pairs):
        left = textwrap.wrap(pair["default"].replace("\n", " ⏎ "), col) or [""]
        right = textwrap.wrap(pair["steered"].replace("\n", " ⏎ "), col) or [""]
        print(f"{'-' * col}-+-{'-' * col}")
        print(f"{('default' + (f' #{i + 1}' if len(pairs) > 1 else '')):<{col}} | steered")
        for k in range(max(len(left), len(right))):
            a = left[k] if k < len(left) else ""
            b = right[k] if k < len(right) else ""
            print(f"{a:<{col}} | {b}")


@dataclass
class SteerConfig:
    """Flags of ``monoscope steer`` (the prompt is its one positional argument)."""
    sae: str = field(metadata={"help": "SAE folder"})
    feature: tuple[int, ...] = field(metadata={"repeat": True, "help": "latent to steer (repeatable)"})
    value: tuple[float, ...] = field(default=(), metadata={
        "repeat": True, "help": "clamp value / added coefficient: one for all features or one per --feature "
                                "(default: 0)"})
    mode: tuple[str, ...] = field(default=(), metadata={
        "repeat": True, "choices": MODES,
        "help": "clamp, add or ablate: one for all features or one per --feature (default: clamp)"})
    model: str | None = field(default=None, metadata={
        "help": "model to load (default: the model the SAE was trained on)"})
    hook: str = field(default="", metadata={
        "help": "the hook the SAE reads, for files that do not record it (Gemma Scope 1 params.npz)"})
    max_new_tokens: int = field(default=40, metadata={"help": "tokens generated per continuation"})
    samples: int = field(default=1, metadata={"help": "continuations per arm"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (0 = greedy)"})
    seed: int = 0
    device: str = "cpu"


def setup_steer(p):
    """``monoscope steer --sae DIR --feature 123 --value 8 [--mode clamp|add|ablate] ... "prompt"``."""
    from monoscope.config import add_arguments

    p.add_argument("prompt", help="text to continue")
    add_arguments(p, SteerConfig)

    def run(ns):
        from monoscope.config import from_namespace
        from monoscope.models import load_model
        from monoscope.sae.io import load_sae
        from monoscope.selfcheck import sae_for_model

        cfg = from_namespace(SteerConfig, ns)
        sae = load_sae(cfg.sae)
        name = cfg.model or sae.cfg.model_name
        if not name:
            raise MonoscopeError("the SAE does not record its model; pass --model")
        ivs = _pair_up(list(cfg.feature), list(cfg.value), list(cfg.mode))
        lm = load_model(name, device=cfg.device)
        sae.to(lm.device)
        sae_for_model(sae, lm, cfg.hook or None)
        pairs = generate_side_by_side(lm, sae, ns.prompt, ivs, max_new_tokens=cfg.max_new_tokens,
                                      n_samples=cfg.samples, seed=cfg.seed, temperature=cfg.temperature)
        print("steering: " + ", ".join(f"{iv.mode} #{iv.feature}" + ("" if iv.mode == "ablate" else f" = {iv.value:g}")
                                       for iv in ivs))
        print_side_by_side(pairs, ns.prompt)
    return run
