"""Does clamping a concept feature make Gemma 3 270M talk about the concept? The run's steering demo, measured.

    python benchmarks/steering.py RUN_FOLDER [--samples 24] [--tokens 24] [--seed 0] [--out steering.json]

RUN_FOLDER is a finished `monoscope run` (its SAE under saes/saes/ and feature statistics under
stats/features). The script runs the same choice and measurement as the pipeline's steer stage
(monoscope.pipeline._steering_demo): common words from unsteered text, concept candidates from the
feature statistics, a three-round screen (bfloat16 where native), then `steering_effect` on fresh seeds in
fp32. Prints the feature, its keywords, keyword rate / feature activation / distinct-token share default vs
steered with standard errors, the one-sided Fisher exact p-value of the keyword rise, a bootstrap 95%
interval of the activation difference, and example texts.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from monoscope.models import load_model
from monoscope.pipeline import RunConfig, _pick_main_sae, _steering_demo


def _measure_one(lm, sae_folder, stats, feature, cfg):
    """The demo's measurement for a given feature: same prompts, seeds, keywords rule and clamp value."""
    from monoscope.interpret.autointerp import StatsReader
    from monoscope.interpret.steer import steering_effect
    from monoscope.pipeline import (KEYWORD_MAX_SHARE, STEER_PROMPTS, common_words, feature_keywords,
                                    special_words, steer_samples_per_prompt, steering_value, unsteered_texts)
    from monoscope.sae.io import load_sae

    rec = StatsReader(stats).record(feature)
    stop = common_words(unsteered_texts(lm, cfg), KEYWORD_MAX_SHARE) | special_words(lm.tokenizer)
    keys = feature_keywords(rec, stop)
    value = steering_value(rec["max"])
    eff = steering_effect(lm, load_sae(sae_folder), feature, value, list(STEER_PROMPTS),
                          n_samples=steer_samples_per_prompt(cfg), max_new_tokens=cfg.steer_tokens, seed=cfg.seed,
                          keywords=keys)
    texts = {arm: eff[arm].pop("texts") for arm in ("default", "steered")}
    return {"feature": feature, "value": value, "keywords": keys, "density": rec["density"], "effect": eff,
            "texts": texts, "explanation": "given with --feature",
            "screen": {"candidates": 0, "keyword_rate": float("nan"), "distinct_tokens": float("nan")}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a finished run folder")
    ap.add_argument("--samples", type=int, default=24, help="continuations per arm (spread over 3 prompts)")
    ap.add_argument("--tokens", type=int, default=24, help="tokens per continuation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--feature", type=int, default=None,
                    help="measure this feature (keywords from its statistics, clamp at its max) instead of choosing one")
    ap.add_argument("--out", default=None, help="where to write the full result (JSON)")
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    run = Path(ns.run)
    cfg = RunConfig(**{k: v for k, v in json.loads((run / "run_config.json").read_text()).items()
                       if k in RunConfig.__dataclass_fields__})
    cfg.steer_samples, cfg.steer_tokens, cfg.seed = ns.samples, ns.tokens, ns.seed
    table = json.loads((run / "saes" / "stage.json").read_text())["result"]["table"]
    sae = str(run / "saes" / _pick_main_sae(table))
    lm = load_model(cfg.model, device=cfg.device)
    started = time.perf_counter()
    stats = str(run / "stats" / "features")
    if ns.feature is None:
        with tempfile.TemporaryDirectory() as tmp:
            res = _steering_demo(lm, sae, stats, str(run / "explain" / "features.jsonl"), cfg, Path(tmp))
    else:
        res = _measure_one(lm, sae, stats, ns.feature, cfg)
    eff = res["effect"]
    print(f"SAE {sae}\nfeature {res['feature']}: {res['explanation']}  (density {res['density']:.4f})")
    print(f"keywords {res['keywords']}\nclamp value {res['value']:.1f}; screen over {res['screen']['candidates']} "
          f"candidates: keyword rate {res['screen']['keyword_rate']:.2f}, distinct {res['screen']['distinct_tokens']:.2f}")
    print(f"{'':10}{'keyword rate':>22}{'feature activation':>24}{'distinct tokens':>20}")
    for arm in ("default", "steered"):
        k, a, d = eff[arm]["keyword_rate"], eff[arm]["mean_activation"], eff[arm]["distinct_tokens"]
        print(f"{arm:10}{k['hits']:>5}/{k['n']:<3} {k['mean']:.2f} ± {k['se']:.2f}{a['mean']:>14.2f} ± {a['se']:.2f}"
              f"{d['mean']:>14.2f} ± {d['se']:.2f}")
    print(f"keyword rise: one-sided Fisher exact p = {eff['keyword_p_value']:.2g}")
    lo, hi = eff["difference"]["ci95"]
    print(f"activation difference {eff['difference']['mean']:.2f}, 95% CI [{lo:.2f}, {hi:.2f}]; "
          f"n = {eff['n_prompts']} prompts x {eff['n_samples']} samples per arm")
    for arm in ("default", "steered"):
        print(f"--- {arm} (first of each prompt)")
        for t in res["texts"][arm][::eff["n_samples"]]:
            print("   ", t.replace("\n", " ⏎ ")[:160])
    print(f"took {time.perf_counter() - started:.0f} s")
    if ns.out:
        Path(ns.out).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
