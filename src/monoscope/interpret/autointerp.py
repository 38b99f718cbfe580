"""Automated interpretability: an LLM explains a feature from its examples, then the explanation is scored.

* ``explain``: show top-activating and interval-sampled excerpts with the firing tokens marked
  ``<<token>>(level)`` (level 0-10 relative to the feature's maximum) and ask for a short explanation.
* ``score_detection``: given the explanation, can the LLM tell activating excerpts from non-activating
  ones (no marks shown)? -> accuracy, precision, recall, F1.
* ``score_fuzzing``: activating excerpts with either the truly firing tokens marked or as many random
  ones; can the LLM tell which marking fits the explanation? -> accuracy, F1.
* ``score_intruder`` (delphi): no explanation; among excerpts where the feature fires one does not belong
  (a non-activating one) — can the LLM name it? -> accuracy against chance 1/group.
* ``score_simulation``: the LLM predicts each token's activation (0-10); Pearson correlation with the
  true activations over all tokens.
* ``explain_features``: all of the above for many features, one JSON line per finished feature, so an
  interrupted run keeps its work and a rerun skips what is done.

Excerpts used to write the explanation are never used to score it (even/odd split of each list).
Nothing here raises for a bad completion: it becomes a recorded failure or a low score.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from monoscope.artifacts import atomic_path, fsync_dir
from monoscope.errors import MonoscopeError
from monoscope.interpret.backends import Backend, BackendError, make_backend
from monoscope.interpret.feature_stats import FeatureStats
from monoscope.interpret.token_explainer import contains_any, describe as describe_tokens, distinctive_tokens

EXPLANATION_SCORES = ("detection", "fuzzing", "simulation")  # each scores one explanation
SCORES = EXPLANATION_SCORES + ("intruder",)  # intruder scores the unit itself, with no explanation


# ---------------------------------------------------------------- inputs
@dataclass
class Example:
    """A window of decoded tokens with the feature's activation on each."""

    tokens: list[str]
    acts: list[float]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.acts):
            raise MonoscopeError(f"an Example needs one activation per token; got {len(self.tokens)} tokens "
                                 f"and {len(self.acts)} activations")
        self.acts = [float(a) for a in self.acts]

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class FeatureExamples:
    """What the feature-statistics artifact gives for one feature."""

    feature: int
    top: list[Example]
    intervals: list[Example] = field(default_factory=list)
    negatives: list[Example] = field(default_factory=list)  # non-activating (random) contexts

    @property
    def max_act(self) -> float:
        return max((e.max_act for e in self.top + self.intervals), default=0.0)


@dataclass
class Explanation:
    """The parsed explanation (``text``), the prompt it came from and the raw completion."""

    text: str
    prompt: str
    raw: str
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


# ---------------------------------------------------------------- rendering
def _visible(token: str) -> str:
    return token.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


def activation_levels(example: Example, max_act: float) -> list[int]:
    """Each token's activation as an integer 0-10 relative to ``max_act`` (0 = not firing)."""
    if max_act <= 0:
        return [0] * len(example.acts)
    return [min(10, max(0, round(10 * a / max_act))) for a in example.acts]


def render(example: Example, marks: Iterable[int] = (), levels: list[int] | None = None) -> str:
    """One-line text of an excerpt with the tokens at ``marks`` shown as ``<<token>>`` (plus ``(level)``)."""
    marks = set(marks)
    parts = []
    for i, tok in enumerate(example.tokens):
        tok = _visible(tok)
        if i in marks:
            core = tok.lstrip(" ")
            lead = tok[: len(tok) - len(core)]
            level = f"({levels[i]})" if levels is not None else ""
            parts.append(f"{lead}<<{core}>>{level}")
        else:
            parts.append(tok)
    return "".join(parts).strip()


def _firing(example: Example, max_act: float) -> list[int]:
    return [i for i, lvl in enumerate(activation_levels(example, max_act)) if lvl > 0]


# ---------------------------------------------------------------- explain
EXPLAIN_PROMPT = """We are studying one feature (a neuron-like unit) inside a language model.
Below are text excerpts where it is active. The tokens where it fires are marked <<like this>>, followed by
its strength from 1 to 10 in parentheses.
Find what the marked tokens have in common (the token itself, its context, or what usually comes next)
and describe it in a short phrase of at most 15 words, on one line.

{examples}

Explanation:"""


def explain(features: FeatureExamples, backend: Backend, *, max_examples: int = 20, max_tokens: int = 80,
            temperature: float = 0.0) -> Explanation:
    """Ask ``backend`` for a short explanation of the feature from its top and interval examples."""
    shown = _pick_shown(features, max_examples)
    if not shown:
        return Explanation("", "", "", failure="no activating examples to explain")
    top = features.max_act
    lines = [f"Excerpt {i + 1}: {render(e, _firing(e, top), activation_levels(e, top))}"
             for i, e in enumerate(shown)]
    prompt = EXPLAIN_PROMPT.format(examples="\n".join(lines))
    [raw] = backend.complete_batch([prompt], max_tokens=max_tokens, temperature=temperature)
    if isinstance(raw, BackendError):
        return Explanation("", prompt, "", failure=f"backend: {raw}")
    text, failure = parse_explanation(raw, prompt=prompt)
    return Explanation(text or "", prompt, raw, failure=failure)


def _pick_shown(fx: FeatureExamples, limit: int) -> list[Example]:
    """Up to ``limit`` examples: the top ones first, then interval ones spread evenly over the intervals."""
    n_int = min(len(fx.intervals), limit // 2)
    n_top = min(len(fx.top), limit - n_int)
    n_int = min(len(fx.intervals), limit - n_top)
    step = len(fx.intervals) / n_int if n_int else 0
    return fx.top[:n_top] + [fx.intervals[int(i * step)] for i in range(n_int)]


def parse_explanation(raw: str, max_chars: int = 200, prompt: str = "") -> tuple[str | None, str | None]:
    """(explanation, None) from a completion, or (None, reason) if it is empty, garbage or only echoes
    ``prompt``. Tries the line after each "Explanation:" (last first), then every line in order."""
    if not raw or not raw.strip():
        return None, "empty completion"
    candidates = []
    for m in reversed(list(EXPLANATION_LABEL.finditer(raw))):
        after = [ln for ln in raw[m.end():].splitlines() if ln.strip()]
        candidates += after[:1]
    candidates += [ln for ln in raw.splitlines() if ln.strip()]
    echoed = False
    flat_prompt = " ".join(prompt.split()).lower()
    for line in candidates:
        line = HTML_TAG.sub("", line)  # a base model sometimes wraps its answer in markup
        line = LEADING_LABEL.sub("", line)  # a whole line "Explanation: ..." is its answer, unlabelled
        text = line.strip().strip(" \t*#>`\"'-_").strip()
        if len(text) > max_chars:
            text = text[:max_chars].rsplit(" ", 1)[0]
        if _is_garbage(text):
            continue
        flat = " ".join(text.split()).lower()
        if (len(flat) >= 12 and flat[:60] in flat_prompt) or _paraphrases_task(text) or _only_task_words(text):
            echoed = True  # a base model often continues by quoting or rewording the task
            continue
        return text, None
    if echoed:
        return None, f"completion only repeats the prompt: {raw.strip()[:80]!r}"
    return None, f"garbage completion: {raw.strip()[:80]!r}"


EXPLANATION_LABEL = re.compile(r"explanation\s*[:\-]", re.IGNORECASE)
LEADING_LABEL = re.compile(r"^[\s*#>`_]*explanation\s*[:\-]", re.IGNORECASE)
# markup, but not the excerpts' own <<token>> markers ("<<a>>", "<<b>>")
HTML_TAG = re.compile(r"(?<!<)</?(?:span|div|p|b|i|u|em|strong|code|pre|br|a|ul|ol|li|h[1-6])\b[^<>]*>(?!>)",
                      re.IGNORECASE)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


TASK_WORDS = _words(EXPLAIN_PROMPT.replace("{examples}", " "))
TASK_SHINGLES = {tuple(TASK_WORDS[i:i + 4]) for i in range(len(TASK_WORDS) - 3)}


def _paraphrases_task(text: str) -> bool:
    """Is ``text`` mostly the instructions again: at least 60 % of its words, and five or more, inside runs of
    four words that the instructions also have ("The following are text excerpts where it is active"), or, for two or three
    words, such a run on its own ("Find what")?"""
    words = _words(text)
    if 2 <= len(words) < 4:
        return any(tuple(TASK_WORDS[i:i + len(words)]) == tuple(words) for i in range(len(TASK_WORDS)))
    covered = set()
    for i in range(len(words) - 3):
        if tuple(words[i:i + 4]) in TASK_SHINGLES:
            covered.update(range(i, i + 4))
    return len(covered) >= max(5, 0.6 * len(words))  # five: "numbers from 1 to 10" is not an echo


# words that only name the task's own material: what an explanation says when it says nothing of the unit
TASK_MATERIAL = frozenset("a an the is are was were be this that these those of in on at to from for with by and or "
                          "as it its there here all each some any following list lists listed contain contains "
                          "containing shown given above below about text texts excerpt excerpts sentence sentences "
                          "example examples token tokens word words marked feature features unit units neuron "
                          "neurons explanation find describe".split())


def _only_task_words(text: str) -> bool:
    """Does ``text`` name nothing but the task's own material ("The following are the text excerpts from the
    text.", "a list of the tokens")? A quote mark or a <<marker>> (a quoted token: "the token 'the'") or any
    word outside ``TASK_MATERIAL`` ("words in parentheses", "what comes next") counts as content."""
    if re.search(r"[\"'“”‘’«»]|<<", text):
        return False
    words = _words(text)
    return bool(words) and all(w in TASK_MATERIAL for w in words)


def _is_garbage(text: str) -> bool:
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    words = [w for w in re.findall(r"[^\W\d_]+", text) if len(w) >= 3]
    return not words or letters < 0.6 * len(text) or bool(re.fullmatch(r"(?i)explanation\s*[:\-]?", text))


# ---------------------------------------------------------------- yes/no and index answers
def parse_selection(raw: str, n: int) -> list[bool] | None:
    """Which of excerpts 1..n the answer selects, or None if it cannot be read.

    Reads a list of numbers ``[2, 5]`` (or ``[]``), a 0/1 vector ``[0, 1, 1]`` of length n,
    lines like ``2: yes``, a bare yes/no when n == 1, "none", or a sentence like "Excerpts 2 and 4".
    """
    if not raw or not raw.strip():
        return None
    text = raw.strip()
    for match in reversed(re.findall(r"\[([^\[\]]*)\]", text)):
        items = [s.strip().strip("'\"").lower() for s in match.split(",") if s.strip()]
        if all(s in ("yes", "no", "true", "false") for s in items) and len(items) == n and n > 0:
            return [s in ("yes", "true") for s in items]
        if not all(re.fullmatch(r"\d+", s) for s in items):
            continue
        nums = [int(s) for s in items]
        if len(nums) == n and set(nums) <= {0, 1} and (0 in nums or len(set(nums)) < len(nums) or n == 1):
            return [x == 1 for x in nums]
        if all(1 <= x <= n for x in nums):
            return [i + 1 in nums for i in range(n)]
    per_line = {}
    for m in re.finditer(r"^\W*(?:excerpt\s*)?(\d+)\W*\s*(yes|no|true|false)\b", text, re.IGNORECASE | re.MULTILINE):
        per_line[int(m.group(1))] = m.group(2).lower() in ("yes", "true")
    if per_line and all(i + 1 in per_line for i in range(n)):
        return [per_line[i + 1] for i in range(n)]
    first = text.splitlines()[0].strip().lower()
    if n == 1 and re.match(r"\W*(yes|true)\b", first):
        return [True]
    if n == 1 and re.match(r"\W*(no|false)\b", first):
        return [False]
    if re.match(r"\W*none\b", first) or re.search(r"\bnone of (them|the excerpts)\b", first):
        return [False] * n
    for line in text.splitlines():
        nums = [int(x) for x in re.findall(r"\b\d+\b", line)]
        if nums:
            return [i + 1 in nums for i in range(n)] if all(1 <= x <= n for x in nums) else None
    return None


def classification_metrics(truth: list[bool], pred: list[bool]) -> dict[str, float | None]:
    """Accuracy, precision, recall and F1 of boolean predictions (None where undefined: no data)."""
    tp = sum(t and p for t, p in zip(truth, pred))
    fp = sum(p and not t for t, p in zip(truth, pred))
    fn = sum(t and not p for t, p in zip(truth, pred))
    n = len(truth)
    if n == 0:
        return dict(accuracy=None, precision=None, recall=None, f1=None)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = sum(t == p for t, p in zip(truth, pred)) / n
    return dict(accuracy=accuracy, precision=precision, recall=recall, f1=f1)


def _explanation_text(explanation: Explanation | str) -> str:
    text = explanation.text if isinstance(explanation, Explanation) else str(explanation)
    if not text.strip():
        raise MonoscopeError("cannot score an empty explanation")
    return text


SELECT_PROMPT = """A feature inside a language model has this explanation: "{explanation}"

{task}

{examples}

Reply with the numbers of the matching excerpts as a list, e.g. [1, 3], or [] if none match.
Matching excerpts:"""

DETECTION_TASK = """Below are {n} numbered text excerpts. The feature fires somewhere in some of them and not at all
in others. Which excerpts contain what the explanation describes, so that the feature would fire on them?"""

FUZZING_TASK = """In each of the {n} numbered excerpts below some tokens are marked <<like this>>. In some excerpts the
marks are exactly where the feature fires; in others the marks were put on random tokens.
In which excerpts do the marked tokens fit the explanation?"""


def _score_selection(explanation: str, items: list[tuple[str, bool]], task: str, backend: Backend,
                     seed: int, group_size: int, max_tokens: int) -> dict[str, Any]:
    """Shuffle (rendered excerpt, truth) pairs, ask in groups, and score the parsed selections."""
    items = list(items)
    random.Random(seed).shuffle(items)
    groups = [items[i:i + group_size] for i in range(0, len(items), max(1, group_size))]
    prompts = []
    for group in groups:
        lines = "\n".join(f"Excerpt {i + 1}: {text}" for i, (text, _) in enumerate(group))
        prompts.append(SELECT_PROMPT.format(explanation=explanation, task=task.format(n=len(group)),
                                            examples=lines))
    answers = backend.complete_batch(prompts, max_tokens=max_tokens, temperature=0.0)
    truth, pred, failures, reasons = [], [], 0, []
    for group, answer in zip(groups, answers):
        picked = None if isinstance(answer, BackendError) else parse_selection(answer, len(group))
        if picked is None:
            failures += len(group)
            reasons.append(f"backend: {answer}" if isinstance(answer, BackendError)
                           else f"unparseable answer: {answer.strip()[:80]!r}")
            continue
        truth += [t for _, t in group]
        pred += picked
    out: dict[str, Any] = classification_metrics(truth, pred)
    out.update(n=len(truth), failures=failures)
    return _with_reasons(out, reasons)


def _with_reasons(out: dict, reasons: list[str]) -> dict:
    """A score's first failure reason, and how many of its requests the backend failed (an outage, which
    ``backend_failed`` must see whatever the first reason was)."""
    if reasons:
        out["failure_reason"] = reasons[0]
        out["backend_errors"] = sum(r.startswith("backend:") for r in reasons)
    return out


def _missing(rec: dict, names: Iterable[str]) -> str:
    """The failure line of a record whose scores ``names`` are missing, tagged 'backend:' on an outage."""
    down = sum(int((rec.get(s) or {}).get("backend_errors", 0)) for s in names)
    return f"score(s) missing or failed: {', '.join(names)}" + (f" (backend: {down} request(s) failed)" if down else "")


def score_detection(explanation: Explanation | str, activating: list[Example], non_activating: list[Example],
                    backend: Backend, seed: int = 0, *, group_size: int = 5, max_tokens: int = 60) -> dict:
    """Can the explanation pick out activating excerpts from non-activating ones (shown without marks)?

    Returns accuracy, precision, recall, f1 (over scored excerpts), n (scored) and failures (excerpts
    whose answer was missing or unreadable).
    """
    items = [(render(e), True) for e in activating] + [(render(e), False) for e in non_activating]
    return _score_selection(_explanation_text(explanation), items, DETECTION_TASK, backend, seed,
                            group_size, max_tokens)


INTRUDER_PROMPT = """Below are {n} numbered text excerpts. A feature inside a language model fires in all of them but
one: that one was put in at random. Which excerpt is the odd one out?

{examples}

Reply with the number of that one excerpt, e.g. [2].
Odd one out:"""


def score_intruder(activating: list[Example], non_activating: list[Example], backend: Backend, seed: int = 0, *,
                   group_size: int = 5, max_tokens: int = 20) -> dict:
    """delphi's intruder test: each round shows ``group_size`` − 1 activating excerpts and one non-activating
    one (no marks, no explanation) in random order. Returns accuracy (rounds where the answer names exactly
    the intruder, over the rounds answered), chance (1 / group size), n (rounds answered) and failures."""
    rng = random.Random(seed)
    per = max(1, group_size - 1)
    rounds = min(len(non_activating), len(activating) // per)
    prompts, where = [], []
    for r in range(rounds):
        items = [(render(e), False) for e in activating[r * per:(r + 1) * per]] + [(render(non_activating[r]), True)]
        rng.shuffle(items)
        lines = "\n".join(f"Excerpt {i + 1}: {text}" for i, (text, _) in enumerate(items))
        prompts.append(INTRUDER_PROMPT.format(n=len(items), examples=lines))
        where.append([t for _, t in items])
    answers = backend.complete_batch(prompts, max_tokens=max_tokens, temperature=0.0) if prompts else []
    right, answered, reasons = 0, 0, []
    for truth, answer in zip(where, answers):
        picked = None if isinstance(answer, BackendError) else parse_selection(answer, len(truth))
        if picked is None or sum(picked) != 1:
            reasons.append(f"backend: {answer}" if isinstance(answer, BackendError)
                           else f"not one excerpt: {str(answer).strip()[:80]!r}")
            continue
        answered += 1
        right += picked == truth
    out: dict[str, Any] = dict(accuracy=right / answered if answered else None, chance=1 / (per + 1),
                               n=answered, failures=len(where) - answered)
    if not where:
        out["failure"] = f"too few excerpts for one round of {per} activating + 1 intruder"
    return _with_reasons(out, reasons)


def fuzz_examples(activating: list[Example], seed: int = 0, max_act: float | None = None) -> list[tuple[str, bool]]:
    """Render activating excerpts, half with the true firing tokens marked and half with as many random
    non-firing tokens marked; returns (text, marks_are_correct) pairs."""
    rng = random.Random(seed)
    top = max_act if max_act is not None else max((e.max_act for e in activating), default=0.0)
    order = list(range(len(activating)))
    rng.shuffle(order)
    wrong = set(order[len(order) // 2:])
    out = []
    for i, e in enumerate(activating):
        firing = _firing(e, top) or ([max(range(len(e.acts)), key=e.acts.__getitem__)] if e.acts else [])
        if not firing:
            continue
        others = [j for j in range(len(e.tokens)) if j not in firing and e.tokens[j].strip()]
        if i in wrong and len(others) >= 1:
            out.append((render(e, rng.sample(others, min(len(firing), len(others)))), False))
        else:
            out.append((render(e, firing), True))
    return out


def score_fuzzing(explanation: Explanation | str, activating: list[Example], backend: Backend, seed: int = 0, *,
                  group_size: int = 5, max_tokens: int = 60, max_act: float | None = None) -> dict:
    """Are the marked tokens the ones the explanation is about? Half the excerpts carry the true marks,
    half random ones. Returns accuracy, precision, recall, f1, n and failures."""
    items = fuzz_examples(activating, seed, max_act)
    return _score_selection(_explanation_text(explanation), items, FUZZING_TASK, backend, seed + 1,
                            group_size, max_tokens)


# ---------------------------------------------------------------- simulation
SIMULATION_PROMPT = """A feature inside a language model has this explanation: "{explanation}"

Here is a text excerpt:
{text}

Predict how strongly the feature fires on each of its tokens, from 0 (not at all) to 10 (its maximum).
Most tokens are usually 0. The tokens, one per line:
{tokens}

Reply with one line per token, in the same order: the token, a tab, then the number.
For example, if the explanation were "the word dog" and the tokens "My", " dog", "s", " bark", the reply would be:
My\t0
dog\t10
s\t3
bark\t0

Predictions:
"""


def _norm(token: str) -> str:
    return _visible(token).strip().strip("<>").strip()


def _number(text: str) -> float | None:
    try:
        value = float(text.strip().rstrip(".,;"))
    except ValueError:
        return None
    return min(10.0, max(0.0, value)) if math.isfinite(value) else None


def parse_simulation(raw: str, tokens: list[str]) -> tuple[list[float], int]:
    """Per-token predictions (0-10, missing -> 0) read from a completion, and how many were read.

    Accepts ``token<TAB>number`` lines (also ``token: number``, ``index<TAB>token<TAB>number``), a JSON list
    of numbers (taken in order), or a JSON list of [token, number] pairs. Lines are aligned to tokens in
    order: positionally when their count matches, else by matching token text moving forward.
    """
    n = len(tokens)
    pairs: list[tuple[str | None, float]] = []
    indexed: dict[int, float] = {}
    start, end = raw.find("["), raw.rfind("]")
    if 0 <= start < end:
        try:
            data = json.loads(raw[start:end + 1])
        except ValueError:
            data = None
        if isinstance(data, list):
            for item in data:
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    pairs.append((None, min(10.0, max(0.0, float(item)))))
                elif isinstance(item, (list, tuple)) and len(item) >= 2:
                    value = _number(str(item[-1]))
                    if value is not None:
                        pairs.append((str(item[0]), value))
                elif isinstance(item, dict):
                    nums = [v for v in item.values() if isinstance(v, (int, float))]
                    strs = [v for v in item.values() if isinstance(v, str)]
                    if nums:
                        pairs.append((strs[0] if strs else None, min(10.0, max(0.0, float(nums[-1])))))
    if not pairs:
        for line in raw.splitlines():
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) >= 2:
                value = _number(fields[-1])
                if value is None:
                    continue
                if len(fields) >= 3 and re.fullmatch(r"\s*\d+\s*", fields[0]):
                    indexed[int(fields[0]) - 1] = value  # "index<TAB>token<TAB>number": 1-based
                pairs.append(("\t".join(fields[:-1]), value))
            else:
                m = re.match(r"^(.*?)\s*[:=|,\-]?\s*(-?\d+(?:\.\d+)?)\s*$", line)
                if m:
                    value = _number(m.group(2))
                    if value is not None:
                        pairs.append((m.group(1), value))
    preds = [0.0] * n
    if indexed and len(indexed) == len(pairs) and all(0 <= i < n for i in indexed):
        for i, v in indexed.items():
            preds[i] = v
        return preds, len(indexed)
    if len(pairs) == n:
        return [v for _, v in pairs], n
    j = read = 0
    for tok, value in pairs:
        if j >= n:
            break
        if tok is None or not _norm(tok):
            preds[j] = value
            j, read = j + 1, read + 1
            continue
        target = _norm(tok)
        for k in range(j, n):
            if _norm(tokens[k]) == target:
                preds[k] = value
                j, read = k + 1, read + 1
                break
    return preds, read


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation, or None when either side is constant."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 1e-12 or syy <= 1e-12:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def score_simulation(explanation: Explanation | str, examples: list[Example], backend: Backend, *,
                     max_tokens: int | None = None) -> dict:
    """Predict per-token activations from the explanation; Pearson correlation with the true ones over
    all tokens of all excerpts. Returns pearson (0.0 with a ``note`` if either side is constant), n (tokens
    scored), n_examples, failures (excerpts with no answer) and unparsed (answers with no number read)."""
    text = _explanation_text(explanation)
    prompts = []
    for e in examples:
        tokens = "\n".join(_visible(t).strip() or "(space)" for t in e.tokens)
        prompts.append(SIMULATION_PROMPT.format(explanation=text, text=render(e), tokens=tokens))
    budget = [max_tokens or min(2048, 8 * len(e.tokens) + 32) for e in examples]
    answers: list[Any] = [None] * len(examples)
    for limit in sorted(set(budget)):  # batch the prompts that share a token budget
        idx = [i for i, b in enumerate(budget) if b == limit]
        got = backend.complete_batch([prompts[i] for i in idx], max_tokens=limit, temperature=0.0)
        for i, a in zip(idx, got):
            answers[i] = a
    true, pred, failures, unparsed, reasons = [], [], 0, 0, []
    for e, answer in zip(examples, answers):
        if isinstance(answer, BackendError):
            failures += 1
            reasons.append(f"backend: {answer}")
            continue
        values, read = parse_simulation(answer, e.tokens)
        if read == 0:
            unparsed += 1
            reasons.append(f"unparseable answer: {answer.strip()[:80]!r}")
        true += e.acts
        pred += values
    r = pearson(true, pred)
    out: dict[str, Any] = dict(pearson=r if r is not None else 0.0, n=len(true), n_examples=len(examples) - failures,
                               failures=failures, unparsed=unparsed)
    if r is None:
        out["note"] = ("no tokens scored" if len(true) < 2 else
                       "constant predictions" if len(set(pred)) <= 1 else "constant true activations")
    return _with_reasons(out, reasons)


# ---------------------------------------------------------------- many features
@dataclass
class ExplainConfig:
    """Settings of ``explain_features`` (also the flags of ``monoscope explain``)."""

    backend: str = field(default="hf:gemma-3-270m", metadata={"help": "hf:MODEL, openai:MODEL@BASE_URL or "
                                                                       "openai-completions:MODEL@BASE_URL"})
    scores: tuple[str, ...] = field(default=SCORES, metadata={"help": "which scores to compute"})
    n_explain: int = field(default=20, metadata={"help": "most excerpts shown when asking for an explanation"})
    n_score: int = field(default=10, metadata={"help": "most activating (and non-activating) excerpts per score"})
    group_size: int = field(default=5, metadata={"help": "excerpts per detection/fuzzing prompt"})
    max_tokens: int = field(default=80, metadata={"help": "token budget of the explanation"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature of the explanation"})
    seed: int = field(default=0, metadata={"help": "seed of shuffles and random marks"})
    cache: bool = field(default=True, metadata={"help": "cache completions on disk so reruns never re-ask"})
    concurrency: int = field(default=4, metadata={"help": "parallel requests for HTTP backends"})
    retry_failed: bool = field(default=False, metadata={"help": "redo features whose earlier attempt failed "
                                                                  "or is partial"})
    baseline: bool = field(default=True, metadata={
        "help": "also explain each unit by its most distinctive firing tokens (model-free), score both the same "
                "way and keep the better"})

    def __post_init__(self) -> None:
        bad = [s for s in self.scores if s not in SCORES]
        if bad:
            raise MonoscopeError(f"unknown score(s) {bad}; choose from {', '.join(SCORES)}")
        for name in ("n_explain", "n_score", "group_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise MonoscopeError(f"{name} must be at least 1, got {getattr(self, name)}")


def explain_and_score(fx: FeatureExamples, backend: Backend, config: ExplainConfig | None = None) -> dict:
    """Explain one feature on the even-indexed examples and score it on the odd-indexed ones.

    With ``config.baseline`` the model-free token explanation (token_explainer.py) is scored too, by the same
    scorer on the same excerpts; the record's explanation and scores are the better one's (``explained_by``;
    a tie goes to the baseline), and ``candidates`` keeps both.
    """
    cfg = config or ExplainConfig()
    if not fx.top:
        return dict(status="failed", failure="no activating examples (dead feature?)")
    if len(fx.top) + len(fx.intervals) >= 2:
        shown = FeatureExamples(fx.feature, fx.top[0::2], fx.intervals[0::2], fx.negatives[0::2])
        held = fx.top[1::2] + fx.intervals[1::2]
    else:
        shown, held = FeatureExamples(fx.feature, fx.top, [], fx.negatives[0::2]), list(fx.top)
    rng = random.Random(cfg.seed * 1_000_003 + fx.feature)
    activating = rng.sample(held, min(cfg.n_score, len(held)))
    negatives = rng.sample(fx.negatives[1::2], min(cfg.n_score, len(fx.negatives[1::2])))
    expl = explain(shown, backend, max_examples=cfg.n_explain, max_tokens=cfg.max_tokens,
                   temperature=cfg.temperature)
    candidates = {"llm": _scored(expl, activating, negatives, fx, backend, cfg)}
    if cfg.baseline and not str(expl.failure).startswith("backend:"):  # a backend that is down scores nothing
        tokens = explain_by_tokens(shown, cfg.n_explain)
        base = _scored(tokens, activating, negatives, fx, backend, cfg)
        if tokens.ok:
            words = distinctive_tokens_of(tokens)
            truth = [True] * len(activating) + [False] * len(negatives)
            pred = [contains_any(words, e.tokens) for e in activating + negatives]
            base["rule"] = dict(classification_metrics(truth, pred), n=len(truth), failures=0)
        candidates["tokens"] = base
    chosen = _choose(candidates, [s for s in cfg.scores if s in EXPLANATION_SCORES])
    rec = dict(candidates[chosen], explained_by=chosen)
    if len(candidates) > 1:
        rec["candidates"] = candidates
    if "intruder" in cfg.scores:
        rec["intruder"] = score_intruder(activating, negatives, backend, cfg.seed + fx.feature + 2,
                                         group_size=cfg.group_size)
        if not _score_ok(rec["intruder"]) and rec["status"] == "ok":
            rec.update(status="partial", failure=_missing(rec, ["intruder"]))
    return rec


def _scored(expl: Explanation, activating: list[Example], negatives: list[Example], fx: FeatureExamples,
            backend: Backend, cfg: ExplainConfig) -> dict:
    """One explanation with every configured score, its status and (when not ok) the reason."""
    rec: dict[str, Any] = dict(explanation=expl.text, raw=expl.raw[:1000])
    if not expl.ok:
        return dict(rec, status="failed", failure=expl.failure)
    seed = cfg.seed + fx.feature
    if "detection" in cfg.scores:
        rec["detection"] = (score_detection(expl, activating, negatives, backend, seed, group_size=cfg.group_size)
                            if negatives else dict(failure="no non-activating examples to contrast with", n=0))
    if "fuzzing" in cfg.scores:
        rec["fuzzing"] = score_fuzzing(expl, activating, backend, seed, group_size=cfg.group_size,
                                       max_act=fx.max_act)
    if "simulation" in cfg.scores:
        half = max(1, cfg.n_score // 2)
        rec["simulation"] = score_simulation(expl, activating[:half] + negatives[:half], backend)
    missing = [s for s in cfg.scores if s in EXPLANATION_SCORES and not _score_ok(rec.get(s))]
    rec["status"] = "partial" if missing else "ok"
    if missing:
        rec["failure"] = _missing(rec, missing)
    return rec


def _choose(candidates: dict[str, dict], scores: list[str]) -> str:
    """"llm" only where its explanation beats the token baseline: a higher mean headline value (accuracy;
    Pearson r for simulation) over the scores both candidates completed. A tie, or no score in common, goes to
    the baseline unless it failed outright."""
    if "tokens" not in candidates or candidates["tokens"].get("status") == "failed":
        return "llm"
    if candidates["llm"].get("status") == "failed":
        return "tokens"
    both = [s for s in scores if all(_headline(c.get(s), s) is not None for c in candidates.values())]
    mean = {n: sum(_headline(c.get(s), s) for s in both) / max(1, len(both)) for n, c in candidates.items()}
    return "llm" if both and mean["llm"] > mean["tokens"] else "tokens"


def _headline(score: Any, name: str) -> float | None:
    value = score.get("pearson" if name == "simulation" else "accuracy") if isinstance(score, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and score.get("n") else None


def explain_by_tokens(features: FeatureExamples, max_examples: int = 20) -> Explanation:
    """The model-free baseline: the tokens the feature fires on most distinctively against the tokens of
    non-activating contexts (and of the non-firing positions of the shown excerpts)."""
    shown = _pick_shown(features, max_examples)
    top = features.max_act
    firing, corpus = [], [t for e in features.negatives for t in e.tokens]
    for e in shown:
        marks = set(_firing(e, top))
        firing += [t for i, t in enumerate(e.tokens) if i in marks]
        corpus += [t for i, t in enumerate(e.tokens) if i not in marks]
    words = distinctive_tokens(firing, corpus)
    if not words:
        return Explanation("", "", "", failure="no token stands out at the firing positions")
    return Explanation(describe_tokens(words), "", json.dumps(words))


def distinctive_tokens_of(expl: Explanation) -> list[str]:
    """The tokens of a token explanation (kept in its ``raw``)."""
    return list(json.loads(expl.raw))


def _score_ok(score: Any) -> bool:
    """A score counts only when every one of its prompts was answered and read."""
    return (isinstance(score, dict) and "failure" not in score and score.get("n", 0) > 0
            and not score.get("failures") and not score.get("unparsed"))


def not_ok(records: Iterable[dict]) -> list[dict]:
    """The records whose status is not "ok" (failed or partial): what ``retry_failed`` redoes."""
    return [r for r in records if r.get("status") != "ok"]


def backend_failed(records: Iterable[dict]) -> list[dict]:
    """The not-ok records whose failure came from the backend (unreachable, errors, malformed answers): worth
    retrying once the endpoint works. An explanation the model wrote but that could not be parsed is an
    outcome, not an outage, and is not among them."""
    return [r for r in not_ok(records) if "backend:" in str(r.get("failure", ""))]


def read_results(path: str | os.PathLike) -> dict[int, dict]:
    """Finished features in a results file (JSON lines; later lines win). A torn last line (a write cut off
    by a crash) is ignored; any other line that is not a feature record is an error naming the line."""
    done: dict[int, dict] = {}
    path = Path(path)
    if not path.exists():
        return done
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done[int(rec["feature"])] = rec
        except (ValueError, KeyError, TypeError):
            if number == len(lines) and not text.endswith("\n"):
                continue
            raise MonoscopeError(f"{path}: line {number} is not an explanation record; delete the file (or the "
                                 f"line) and explain again") from None
    return done


def _repair(path: Path, done: dict[int, dict]) -> None:
    """After ``read_results``: rewrite a file whose last line was cut off (``done`` holds every whole record)
    so appends start on a clean line. Every other line was a record, or reading it would have failed."""
    if not path.exists() or path.read_text(errors="replace").endswith("\n"):
        return
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()))


def _append(path: Path, record: dict) -> None:
    """Append one JSON line in a single write and fsync it."""
    data = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _examples_getter(source: Any, n_negatives: int, seed: int) -> Callable[[int], FeatureExamples]:
    if isinstance(source, (str, os.PathLike, StatsReader)):
        reader = source if isinstance(source, StatsReader) else StatsReader(source)
        return lambda f: reader.examples(f, n_negatives=n_negatives, seed=seed)
    if isinstance(source, Mapping):
        table = dict(source)
    else:
        table = {fx.feature: fx for fx in source}

    def get(f: int) -> FeatureExamples:
        if f not in table:
            raise MonoscopeError(f"no examples for feature {f}")
        return table[f]
    return get


def explain_features(source: Any, feature_ids: Iterable[int] | None, backend: Backend | str | None,
                     out_path: str | os.PathLike, config: ExplainConfig | None = None, *,
                     progress: bool | None = None) -> list[dict]:
    """Explain and score each feature, appending one JSON line per finished feature to ``out_path``.

    ``source`` is a feature-statistics folder, a ``{feature: FeatureExamples}`` mapping or a list of
    ``FeatureExamples``; ``feature_ids=None`` means every feature of a mapping/list. ``backend`` is a
    Backend or a spec string (None: ``config.backend``); specs get a disk cache under the monoscope cache
    when ``config.cache``. Feature ids are checked against ``source`` before any request. Features already
    in ``out_path`` are skipped (failed and partial ones too, unless ``config.retry_failed``). A failure is
    recorded with its reason and the run goes on. Returns the records of the requested features in order.
    """
    from monoscope.progress import progress_bar

    cfg = config or ExplainConfig()
    if not isinstance(source, (str, os.PathLike, StatsReader, Mapping)):
        source = list(source)
    if feature_ids is None:
        if isinstance(source, (str, os.PathLike, StatsReader)):
            raise MonoscopeError("give feature_ids when reading a statistics folder")
        feature_ids = list(source) if isinstance(source, Mapping) else [fx.feature for fx in source]
    feature_ids = [int(f) for f in feature_ids]
    _check_ids(source, feature_ids)
    get = _examples_getter(source, 2 * cfg.n_score, cfg.seed)
    if backend is None or isinstance(backend, str):
        backend = backend_from_config(cfg, backend)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_results(out)
    _repair(out, done)
    todo = [f for f in dict.fromkeys(feature_ids)
            if f not in done or (cfg.retry_failed and done[f].get("status") != "ok")]
    bar = progress_bar(total=len(todo), enable=progress, desc="explain")
    for f in todo:
        t0 = time.time()
        rec: dict[str, Any] = dict(feature=f)
        try:
            rec.update(explain_and_score(get(f), backend, cfg))
        except Exception as exc:  # one bad feature must not end a long run
            rec.update(status="failed", failure=f"{type(exc).__name__}: {exc}")
        rec.update(backend=backend.identity, seconds=round(time.time() - t0, 3))
        _append(out, rec)
        done[f] = rec
        bar.update(1)
    bar.close()
    fsync_dir(out.parent)
    return [done[f] for f in feature_ids]


def _check_ids(source: Any, feature_ids: list[int]) -> None:
    """Raise before any request if a feature id is not in ``source`` (a stats folder, mapping or list)."""
    if isinstance(source, (str, os.PathLike, StatsReader)):
        n = len(source if isinstance(source, StatsReader) else StatsReader(source))
        bad = [f for f in feature_ids if not 0 <= f < n]
        known = f"the statistics have features 0..{n - 1}"
    else:
        have = set(source) if isinstance(source, Mapping) else {fx.feature for fx in source}
        bad = [f for f in feature_ids if f not in have]
        known = f"examples were given for {len(have)} features"
    if bad:
        raise MonoscopeError(f"feature id(s) {bad[:10]} out of range; {known}")


def backend_from_config(cfg: ExplainConfig, spec: str | None = None) -> Backend:
    """Build the backend a config names, with the disk cache and concurrency it asks for."""
    from monoscope.models import cache_dir

    spec = spec or cfg.backend
    kwargs: dict[str, Any] = {"concurrency": cfg.concurrency} if spec.startswith("openai") else {}
    return make_backend(spec, cache_dir=cache_dir() / "llm-cache" if cfg.cache else None, **kwargs)


# ---------------------------------------------------------------- feature-statistics adapter
# A statistics folder is read through its owning class; ``StatsReader`` is the name explain_features uses.
StatsReader = FeatureStats


def top_features(stats_folder: str | os.PathLike, n: int) -> list[int]:
    """``FeatureStats(stats_folder).top_features(n)``: the n densest live features (for ``--top-n``)."""
    return FeatureStats(stats_folder).top_features(n)


# ---------------------------------------------------------------- CLI
def setup_explain(p):
    """Flags of ``monoscope explain``; returns the function that runs it."""
    from monoscope.config import add_arguments

    add_arguments(p, ExplainConfig)
    p.add_argument("--stats", required=True, help="feature-statistics folder (monoscope stats)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--features", type=int, nargs="+", help="feature ids to explain")
    which.add_argument("--top-n", type=int, help="explain the N live features with the highest activation")
    p.add_argument("--out", default=None, help="results file (JSON lines; default STATS/explanations.jsonl)")

    def run(ns) -> int:
        from monoscope.config import from_namespace

        cfg = from_namespace(ExplainConfig, ns)
        features = ns.features if ns.features else top_features(ns.stats, ns.top_n)
        out = ns.out or str(Path(ns.stats) / "explanations.jsonl")
        wanted = set(features)
        earlier = [r for f, r in read_results(out).items() if f in wanted]
        kept = not_ok(earlier)
        if kept and not cfg.retry_failed:
            print(f"explain: {len(kept)} of {len(earlier)} earlier records in {out} are not ok "
                  "and are kept as they are; --retry-failed retries them", file=sys.stderr)
        records = explain_features(ns.stats, features, None, out, cfg)
        for rec in records:
            scores = "  ".join(_summary(rec, s) for s in cfg.scores if isinstance(rec.get(s), dict))
            what = rec.get("explanation") or f"[{rec.get('status')}: {rec.get('failure')}]"
            print(f"{rec['feature']}\t{what}\t{scores}")
        bad, down = not_ok(records), backend_failed(records)
        print(f"# {len(records) - len(bad)}/{len(records)} features ok; results in {out}")
        if down:  # an outage: the work is incomplete and worth redoing
            print(f"explain: {len(down)} of {len(records)} features not ok ({down[0].get('failure')}); "
                  "rerun with --retry-failed after fixing the endpoint", file=sys.stderr)
        elif bad:  # the model's own answers: an outcome, recorded as such
            print(f"explain: {len(bad)} of {len(records)} features have scores the model's answers did not "
                  f"settle ({bad[0].get('failure')}); they are recorded as {bad[0].get('status')}", file=sys.stderr)
        return 1 if down else 0
    return run


def _summary(rec: dict, score: str) -> str:
    value = rec[score].get("pearson" if score == "simulation" else "accuracy")
    return f"{score}={value:.2f}" if isinstance(value, (int, float)) else f"{score}=n/a"
