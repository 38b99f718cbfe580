"""The steering demonstration: find an SAE feature whose clamping makes the model talk about its concept,
then measure that on fresh seeds.

    demo = find_steering_feature(lm, sae, stats_folder, DemoConfig(samples=24))
    demo.save(folder)                       # steering.json, read back with SteeringDemo.load(folder)

1. The model's unsteered continuations of the demo prompts give the common words to leave out
   (``common_words``): a feature whose concept the model says anyway cannot show steering.
2. Features whose top examples sit on one uncommon word are the candidates (``concept_candidates``).
3. A screen clamps every candidate once per prompt (short continuations, a bfloat16 copy of the model where
   that is fast), then the best ``FINALISTS`` four more times per prompt at full length and the best four of
   those eight more times, and keeps the one whose keywords appear most beyond their unsteered rate while the
   text stays readable. Most candidates do nothing when clamped, so the screen must be wide.
4. ``steering_effect`` measures the pick on other seeds in full precision: keyword rate (Fisher exact
   p-value), the feature's activation on the generated text and the distinct-token share, default vs steered.
   Choosing on the screen and measuring on fresh samples keeps the reported effect free of the selection.
5. ``baseline_vector`` steers the same concept by its difference-of-means direction at matched norm, a third
   arm of the same measurement (same prompts, seeds and unsteered arm): SAE steering is worth reporting only
   beside it. A concept probe (``concept_probe``, trained on the same examples) scores every arm's text as a
   second judge beside the feature's own activation.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from monoscope.artifacts import JsonResult, jsonable
from monoscope.errors import MonoscopeError
from monoscope.interpret.steer import (add_vector, continuations, directions, mentions, screen_features,
                                       steering_effect, words)

PROMPTS = ("I think that", "The most important thing is", "Here is a short story:")
KEYWORD_MAX_SHARE = 0.2  # a keyword found in more unsteered continuations than this cannot show an increase
FINALISTS = 32  # candidates of the screen's second round


@dataclass
class DemoConfig:
    """Sizes of the demo (the run's ``steer_*`` settings)."""

    samples: int = 20  # generations per arm, spread over the prompts
    tokens: int = 24  # tokens per generation
    candidates: int = 1024  # features screened
    seed: int = 0

    @property
    def per_prompt(self) -> int:
        """Continuations per prompt and arm (at least 2 each, for a standard error)."""
        return max(2, -(-self.samples // len(PROMPTS)))


@dataclass
class SteeringDemo(JsonResult):
    """The demo's result; owns ``steering.json`` (``save`` / ``load``)."""

    FILE = "steering.json"
    WHAT = "steering result"
    FIX = "rerun the steer stage"

    feature: int
    value: float
    keywords: list[str]
    effect: dict
    texts: dict
    keyword: str = ""
    keyword_share_of_top_examples: float = 0.0
    density: float = 0.0
    explanation: str = ""
    screen: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)
    prompt: str = PROMPTS[0]
    mode: str = "clamp"
    baseline: dict = field(default_factory=dict)  # the difference-of-means direction on the same prompts/seeds


# ---------------------------------------------------------------------------------------------- keywords

def common_words(texts: list[str], max_share: float = 0.03) -> set[str]:
    """Words found in more than ``max_share`` of the model's own unsteered continuations ('the', 'what').

    Clamping a function-word feature breaks the text rather than adding a topic, and a word that is there
    anyway cannot show steering: this list, taken from the model's own text, keeps them out without a
    hand-written stop list.
    """
    df = Counter(w for t in texts for w in set(words(t)))
    return {w for w, c in df.items() if c > max_share * max(1, len(texts))}


def special_words(tokenizer) -> set[str]:
    """The words inside the tokenizer's special tokens ('<eos>' -> 'eos'): never a concept or a keyword."""
    return {w for tok in tokenizer.all_special_tokens for w in words(tok)}


def _focus_words(record: dict) -> Counter:
    """How often each word is the token a feature's top examples sit on."""
    return Counter(w for ex in record.get("top", []) if ex.get("tokens") for w in words(ex["tokens"][ex["focus"]]))


def feature_keywords(record: dict, common: set[str] = frozenset(), min_count: int = 2) -> list[str]:
    """The words a feature stands for: those its top examples sit on (at least ``min_count`` times), plus the
    promoted tokens that are inflections of them (same first four letters: 'vehicle' → 'vehicles'), lower-cased,
    3+ letters, minus ``common`` words. Promoted tokens alone are not taken: at a middle layer they are
    mostly unrelated fragments ('same', 'along') that would count as hits by chance."""
    keys = {w for w, c in _focus_words(record).items() if c >= min_count and len(w) >= 3}
    stems = {w[:4] for w in keys if len(w) >= 4}
    promoted = {w for tok, _ in (record.get("logits") or {}).get("pos", []) for w in words(tok)}
    keys |= {w for w in promoted if len(w) >= 4 and w[:4] in stems}
    return sorted(w for w in keys if w not in common)


def concept_candidates(stats_folder: str, common: set[str] = frozenset(), max_density: float = 0.05,
                       min_density: float = 2e-4, min_share: float = 0.3, n: int = 128,
                       frequent: set[str] | None = None) -> list[dict]:
    """Features whose top examples mostly sit on one uncommon word (a concrete concept), best first.

    Dense features (above ``max_density``) are skipped: clamping one changes everything and shows no
    concept. Ranked by the share of top examples on that word (ties: the denser feature). Each candidate
    carries its concept word, that share, its density, its largest activation and its keywords (minus the
    ``frequent`` words, by default the ``common`` ones).
    """
    import numpy as np

    from monoscope.interpret.feature_stats import FeatureStats

    reader = FeatureStats(stats_folder)
    density, peak = reader.arrays["density"].numpy(), reader.arrays["max"].numpy()
    pool = np.flatnonzero((density >= min_density) & (density <= max_density))
    found = []
    for f in pool:
        rec = reader.record(int(f))
        focus = Counter({w: c for w, c in _focus_words(rec).items() if len(w) >= 3 and w not in common})
        if not focus:
            continue
        word, count = focus.most_common(1)[0]
        share = count / max(1, len(rec.get("top", [])))
        if share >= min_share:
            found.append({"feature": int(f), "word": word, "share": share, "density": float(density[f]),
                          "max": float(peak[f]),
                          "keywords": feature_keywords(rec, common if frequent is None else frequent)})
    found.sort(key=lambda c: (-c["share"], -c["density"]))
    return found[:n]


def steering_value(max_activation: float) -> float:
    """Clamp value of the demo: the feature's largest activation seen in the corpus.

    On Gemma 3 270M (layer 6, TopK, feature 1069 'first/last') 0.5× the max lifted the keyword rate 0 → 4/24,
    1× to 10/24 with readable text (distinct-token share 0.81 → 0.70), 1.5× to 7/24 with number soup (0.52);
    2× turned text into loops and the keyword rate fell.
    """
    return float(max_activation)


def unsteered_texts(lm, cfg: DemoConfig) -> list[str]:
    """The model's own continuations of the demo prompts (seeds apart from the measured ones): the words it
    uses anyway, which a keyword must not be."""
    return [t for i, p in enumerate(PROMPTS)
            for t in continuations(lm, p, cfg.per_prompt, cfg.tokens, 0.7, cfg.seed + 1000 + i)]


# ---------------------------------------------------------------------------------------------- the screen

def _screen_rounds(lm, sae, found: list[dict], plain: list[str], cfg: DemoConfig) -> tuple[dict, dict]:
    """Three screening rounds over ``found``; returns (the pick, its pooled screen figures)."""
    from scipy.stats import binom

    from monoscope.models import screening_copy

    for c in found:
        # how often the unsteered text has the keywords anyway (add-one smoothed: never exactly zero)
        c["base_rate"] = (sum(mentions(t, c["keywords"]) for t in plain) + 1) / (len(plain) + 2)
    fast = screening_copy(lm)

    def screen(cands: list[dict], repeats: int, tokens: int, seed: int) -> dict[int, dict]:
        rows = [c for c in cands for _ in range(repeats)]  # repeated rows: more continuations per feature
        out = screen_features(fast, sae, [c["feature"] for c in rows], [steering_value(c["max"]) for c in rows],
                              [c["keywords"] for c in rows], list(PROMPTS), max_new_tokens=tokens, seed=seed)
        return {r["feature"]: r for r in out}

    def promise(result: dict[int, dict]):
        """Readable text first, then how unlikely its keyword hits are at the unsteered rate (a binomial tail:
        5 of 12 is striking for a word the model never says, chance for one it says every fifth time),
        then the feature's activation on the text."""
        def key(c):
            r = result[c["feature"]]
            return r["distinct_tokens"] >= 0.6, -binom.sf(r["hits"] - 1, r["n"], c["base_rate"]), r["activation"]
        return key

    first = screen(found, 1, min(cfg.tokens, 12), cfg.seed + 2000)
    finalists = sorted(found, key=promise(first), reverse=True)[:FINALISTS]
    second = screen(finalists, 4, cfg.tokens, cfg.seed + 3000)
    # the best of 32 on 12 samples is partly luck: the top four get 24 more, and the pooled counts decide
    best = sorted(finalists, key=promise(second), reverse=True)[:4]
    third = screen(best, 8, cfg.tokens, cfg.seed + 4000)
    pooled = {f: _pool(second[f], third[f]) for f in third}
    pick = max(best, key=promise(pooled))
    return pick, {"candidates": len(found), "finalists": len(finalists), "keyword_base_rate": pick["base_rate"],
                  **{k: pooled[pick["feature"]][k] for k in ("keyword_rate", "activation", "distinct_tokens")}}


def _pool(a: dict, b: dict) -> dict:
    """Two screens of the same feature as one: summed hits, sample-weighted means."""
    n = a["n"] + b["n"]
    mean = {k: (a[k] * a["n"] + b[k] * b["n"]) / n for k in ("activation", "distinct_tokens")}
    return {"feature": a["feature"], "hits": a["hits"] + b["hits"], "n": n,
            "keyword_rate": (a["hits"] + b["hits"]) / n, **mean}


# ---------------------------------------------------------------------------------------------- entry points

def find_steering_feature(lm, sae, stats_folder: str | Path, cfg: DemoConfig | None = None,
                          explanations: dict[int, str] | None = None) -> SteeringDemo:
    """Screen the concept candidates of ``sae`` (statistics in ``stats_folder``) and measure the best one."""
    cfg = cfg or DemoConfig()
    plain = unsteered_texts(lm, cfg)
    special = special_words(lm.tokenizer)
    frequent = common_words(plain, KEYWORD_MAX_SHARE)
    found = concept_candidates(str(stats_folder), common_words(plain) | special, frequent=frequent | special,
                               n=cfg.candidates)
    if not found:  # nothing uncommon (a tiny model): fall back to the best shared word of any kind
        found = (concept_candidates(str(stats_folder), min_share=0.0, frequent=frequent, n=cfg.candidates)
                 or concept_candidates(str(stats_folder), min_share=0.0, min_density=0.0, max_density=1.0,
                                       frequent=frequent, n=cfg.candidates))
    if not found:
        raise MonoscopeError(f"no SAE feature in {stats_folder} has top examples to steer by; "
                             f"train it on more tokens")
    pick, screen = _screen_rounds(lm, sae, found, plain, cfg)
    explanation = (explanations or {}).get(pick["feature"]) or (
        f"its top examples sit on the word '{pick['word']}' ({pick['share']:.0%} of them)")
    demo = measure_feature(lm, sae, pick, cfg, explanation, stats_folder)
    demo.screen = screen
    return demo


def measure_feature(lm, sae, candidate: dict, cfg: DemoConfig, explanation: str = "",
                    stats_folder: str | Path | None = None) -> SteeringDemo:
    """Measure one candidate (a ``concept_candidates`` entry) on the demo's fresh seeds, in full precision;
    with ``stats_folder``, also the difference-of-means baseline for the same concept (``baseline_vector``),
    as a third arm of the same measurement (all arms compared with one unsteered arm), and every arm's text
    judged by a concept probe (``concept_probe``) beside the feature's own activation."""
    feature, value = candidate["feature"], steering_value(candidate["max"])
    pos_neg = concept_activations(lm, sae, stats_folder, candidate, cfg) if stats_folder is not None else None
    others, probe, baseline = {}, None, {}
    if isinstance(pos_neg, str):
        baseline = {"failure": pos_neg}
    elif pos_neg is not None:
        positive, negative, windows = pos_neg
        vector, baseline = baseline_vector(sae, candidate, positive, negative)
        others = {"baseline": lambda: add_vector(lm, sae.cfg.hook_name, vector)}
        probe, baseline["concept_probe"] = concept_probe(positive, negative, windows, seed=cfg.seed)
    effect = steering_effect(lm, sae, feature, value, list(PROMPTS), n_samples=cfg.per_prompt,
                             max_new_tokens=cfg.tokens, seed=cfg.seed, keywords=candidate["keywords"],
                             others=others, probe=probe)
    if others:
        arm = effect.pop("baseline")
        arm.pop("texts")
        baseline.update({k: arm.pop(k, None) for k in ("difference", "probe_difference", "keyword_p_value")},
                        steered=arm)
    texts = {arm: effect[arm].pop("texts") for arm in ("default", "steered")}
    # the first prompt's first samples of each arm (up to three): row by row the same seed, so they pair up
    first = min(3, cfg.per_prompt)
    pairs = [{"prompt": PROMPTS[0], "default": d, "steered": s}
             for d, s in zip(texts["default"][:first], texts["steered"][:first])]
    return SteeringDemo(feature=feature, value=value, keywords=candidate["keywords"],
                        effect=json.loads(json.dumps(effect, default=jsonable)), texts=texts,
                        baseline=json.loads(json.dumps(baseline, default=jsonable)),
                        keyword=candidate.get("word", ""),
                        keyword_share_of_top_examples=candidate.get("share", 0.0),
                        density=candidate.get("density", 0.0), explanation=explanation, examples=pairs)


def concept_activations(lm, sae, stats_folder: str | Path, candidate: dict,
                        cfg: DemoConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """The concept's examples at the SAE's hook, or why there are none: (the activation at the token where each
    top example fires — its text up to that token run through the model, the last position being the one the
    feature saw —, every token of non-activating windows, the window of each of those tokens)."""
    from monoscope.hookpoints import text_activations
    from monoscope.interpret.feature_stats import FeatureStats

    hook = sae.cfg.hook_name
    fx = FeatureStats(stats_folder).examples(candidate["feature"], n_negatives=24, seed=cfg.seed)
    bos = lm.tokenizer.bos_token or "\0"
    upto = ["".join(e.tokens[:max(range(len(e.acts)), key=e.acts.__getitem__) + 1]) for e in fx.top if e.acts]
    positives = [t.removeprefix(bos) for t in upto if t.removeprefix(bos)]  # the tokenizer adds BOS itself
    negatives = [e.text.removeprefix(bos) for e in fx.negatives]
    if not positives or not negatives:
        return "no top examples or no non-activating windows to take the means of"
    windows = [text_activations(lm, hook, [text]) for text in negatives]
    return (torch.stack([text_activations(lm, hook, [text])[-1] for text in positives]), torch.cat(windows),
            torch.cat([torch.full((len(w),), i) for i, w in enumerate(windows)]))


def baseline_vector(sae, candidate: dict, positive: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The concept's difference-of-means direction (AxBench's baseline), positive minus negative mean, scaled to
    the norm the clamp adds at most (value × ‖d_i‖), and its description; ``add_vector`` adds it everywhere."""
    diff = positive.mean(0) - negative.mean(0)
    d_i = directions(sae, [candidate["feature"]])[0].float().to(diff.device)
    norm = abs(steering_value(candidate["max"])) * float(d_i.norm())
    return diff / diff.norm().clamp_min(1e-12) * norm, {
        "direction": "difference of means (top examples' firing tokens minus the tokens of non-activating windows), "
                     "norm matched",
        "n_positive": len(positive), "n_negative": len(negative), "norm": norm,
        "cosine_with_feature": float(torch.nn.functional.cosine_similarity(diff, d_i, dim=0))}


def concept_probe(positive: torch.Tensor, negative: torch.Tensor, windows: torch.Tensor | None = None, seed: int = 0):
    """A logistic probe for the concept on the hook's activations (standardised, classes balanced): a judge of
    generated text that is not the SAE feature itself. Returns (activations [n, d] -> probabilities [n], its
    description with the 5-fold cross-validated balanced accuracy, or None with under 2 positives per fold).
    ``windows``: the window of each negative token; a window's tokens stay in one fold (neighbouring tokens of
    one text are near-copies, and splitting them would overstate the accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = torch.cat([positive, negative]).float().cpu().numpy()
    y = [1] * len(positive) + [0] * len(negative)
    own = torch.arange(len(negative)) if windows is None else windows.long()
    groups = torch.cat([-1 - torch.arange(len(positive)), own]).numpy()  # each positive is its own group
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    folds = min(5, len(positive) // 2, len(set(own.tolist())))
    cv = (float(cross_val_score(model, x, y, groups=groups, scoring="balanced_accuracy",
                                cv=StratifiedGroupKFold(folds, shuffle=True, random_state=seed)).mean())
          if folds >= 2 else None)
    model.fit(x, y)
    scaler, logreg = model[0], model[1]
    mean, scale = (torch.as_tensor(v, dtype=torch.float32) for v in (scaler.mean_, scaler.scale_))
    w, b = torch.as_tensor(logreg.coef_[0], dtype=torch.float32), float(logreg.intercept_[0])

    def score(acts: torch.Tensor) -> torch.Tensor:
        z = (acts.float().cpu() - mean) / scale
        return torch.sigmoid(z @ w + b)
    return score, {"kind": "logistic regression on the hook's activations, firing tokens vs non-activating tokens; "
                           "cross-validated with each window's tokens in one fold",
                   "n_positive": len(positive), "n_negative": len(negative), "cv_balanced_accuracy": cv}


def candidate_of(lm, stats_folder: str | Path, feature: int, cfg: DemoConfig) -> dict:
    """The candidate entry of any one feature, keywords chosen by the demo's rule (for measuring a feature the
    screen did not pick)."""
    from monoscope.interpret.feature_stats import FeatureStats

    rec = FeatureStats(stats_folder).record(int(feature))
    stop = common_words(unsteered_texts(lm, cfg), KEYWORD_MAX_SHARE) | special_words(lm.tokenizer)
    focus = _focus_words(rec).most_common(1)
    return {"feature": int(feature), "max": float(rec["max"]), "density": float(rec.get("density", 0.0)),
            "word": focus[0][0] if focus else "", "share": 0.0, "keywords": feature_keywords(rec, stop)}
