"""Does clamping a concept feature make Gemma 3 270M talk about the concept? The run's steering demo, measured.

    python benchmarks/steering.py RUN_FOLDER [--samples 24] [--tokens 24] [--seed 0] [--out steering.json]

RUN_FOLDER is a finished `monoscope run` (its SAE under saes/saes/ and feature statistics under
stats/features). The script runs the same choice and measurement as the pipeline's steer stage
(monoscope.interpret.steering_demo.find_steering_feature): common words from unsteered text, concept candidates from the
feature statistics, a three-round screen (bfloat16 where native), then `steering_effect` on fresh seeds in
fp32. Prints the feature, its keywords, keyword rate / feature activation / distinct-token share default vs
steered with standard errors, the one-sided Fisher exact p-value of the keyword rise, a bootstrap 95%
interval of the activation difference, and example texts.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from monoscope.interpret.steering_demo import DemoConfig, candidate_of, find_steering_feature, measure_feature
from monoscope.models import load_model
from monoscope.sae.io import load_sae
from monoscope.stages import Run


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
    run = Run(ns.run)
    settings = json.loads((run.out / "run_config.json").read_text())
    cfg = DemoConfig(samples=ns.samples, tokens=ns.tokens, candidates=settings.get("steer_candidates", 1024),
                     seed=ns.seed)
    sae_folder, stats = run.finished("saes")["main"], run.finished("stats")["features"]
    lm = load_model(settings["model"], device=settings.get("device", "cpu"))
    sae = load_sae(sae_folder)
    started = time.perf_counter()
    if ns.feature is None:
        demo = find_steering_feature(lm, sae, stats, cfg)
    else:
        demo = measure_feature(lm, sae, candidate_of(lm, stats, ns.feature, cfg), cfg, "given with --feature", stats)
    res = demo.to_dict()
    sae = sae_folder
    eff = res["effect"]
    print(f"SAE {sae}\nfeature {res['feature']}: {res['explanation']}  (density {res['density']:.4f})")
    screen = res["screen"] or {"candidates": 0, "keyword_rate": float("nan"), "distinct_tokens": float("nan")}
    print(f"keywords {res['keywords']}\nclamp value {res['value']:.1f}; screen over {screen['candidates']} "
          f"candidates: keyword rate {screen['keyword_rate']:.2f}, distinct {screen['distinct_tokens']:.2f}")
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
