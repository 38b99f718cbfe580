"""The model-free baseline explainer: a unit is "the tokens it fires on most distinctively".

The tokens at the unit's firing positions are compared with the tokens of random corpus contexts by
smoothed log-odds, ((c_fire + 1) / (n_fire + V)) / ((c_corpus + 1) / (n_corpus + V)) with V the number of
distinct tokens seen; special tokens (<eos>, <bos>, …) are never chosen; those fired on at least twice (once when the unit fired fewer than four times) are
ranked by it, and the best are kept until they cover half of the firing positions or three are chosen. The
explanation reads 'the tokens "def", "class" or "import"' and can also be scored as a rule: an excerpt is
predicted to activate exactly when it contains one of the tokens. An LLM explanation worth reading should
beat this on the same excerpts and the same scorer (the baseline AxBench and Kantamneni et al. 2025 ask
for beside every interpretability claim).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable

MAX_TOKENS = 3
SPECIAL = {"<eos>", "<bos>", "<pad>", "<unk>", "<s>", "</s>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>"}


def normalise(token: str) -> str:
    """A token as the rule compares it: no surrounding whitespace, lower case."""
    return token.strip().lower()


def distinctive_tokens(firing: Iterable[str], corpus: Iterable[str], max_tokens: int = MAX_TOKENS) -> list[str]:
    """The tokens that best tell ``firing`` (tokens at firing positions) from ``corpus`` (background tokens)."""
    fire = Counter(t for t in map(normalise, firing) if t and t not in SPECIAL)  # never "the token <eos>"
    back = Counter(t for t in map(normalise, corpus) if t)
    n_fire, n_back = sum(fire.values()), sum(back.values())
    if not n_fire:
        return []
    vocab = len(set(fire) | set(back))
    least = 2 if n_fire >= 4 else 1

    def log_odds(t: str) -> float:
        return math.log((fire[t] + 1) / (n_fire + vocab)) - math.log((back[t] + 1) / (n_back + vocab))
    ranked = sorted((t for t in fire if fire[t] >= least), key=lambda t: (-log_odds(t), -fire[t], t))
    chosen, covered = [], 0
    for t in ranked:
        if log_odds(t) <= 0 or len(chosen) == max_tokens or covered >= n_fire / 2:
            break
        chosen.append(t)
        covered += fire[t]
    return chosen


def describe(tokens: list[str]) -> str:
    """'the token "x"' or 'the tokens "x", "y" or "z"'."""
    quoted = [f'"{t}"' for t in tokens]
    if len(quoted) == 1:
        return f"the token {quoted[0]}"
    return f"the tokens {', '.join(quoted[:-1])} or {quoted[-1]}"


def contains_any(tokens: list[str], example_tokens: Iterable[str]) -> bool:
    """The rule: does an excerpt hold one of ``tokens``?"""
    wanted = set(tokens)
    return any(normalise(t) in wanted for t in example_tokens)
