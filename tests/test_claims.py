"""The claims' verdict rules, the intervals behind them and feature splitting on SAEs built by hand."""
import math

import pandas as pd
import pytest
import torch

from monoscope.intervals import mean_interval, wilson
from monoscope.report.claims import (INCONCLUSIVE, NOT_MEASURED, NOT_REPRODUCED, REPRODUCED, greater,
                                     latent_claims, superposition_claims, tally)


def test_wilson_and_t_intervals_match_textbook_values():
    low, high = wilson(7, 21)
    assert low == pytest.approx(0.1719, abs=1e-3) and high == pytest.approx(0.5458, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and all(math.isnan(v) for v in wilson(0, 0))
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)
    assert math.isnan(mean_interval([5.0])[1])


def test_verdicts_need_separated_intervals():
    assert greater((0.9, 0.85, 0.95), (0.5, 0.4, 0.6)) == REPRODUCED
    assert greater((0.5, 0.4, 0.6), (0.9, 0.85, 0.95)) == NOT_REPRODUCED
    assert greater((0.7, 0.5, 0.8), (0.6, 0.45, 0.75)) == INCONCLUSIVE
    assert tally([REPRODUCED, REPRODUCED, INCONCLUSIVE])[0] == REPRODUCED
    assert tally([REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE])[0] == INCONCLUSIVE
    assert tally([])[0] == NOT_MEASURED


def _rows(dataset, layer, k, f1, half, precision=0.5, **extra):
    return {"dataset": dataset, "layer": layer, "k": k, "method": "mean_diff", "control": "none", "f1": f1,
            "f1_low": f1 - half, "f1_high": f1 + half, "precision": precision, "precision_low": precision - half,
            "precision_high": precision + half, "recall": 0.5, "recall_low": 0.4, "recall_high": 0.6, **extra}


class _Cfg:
    probe_examples, seeds, steer_samples = 1000, 3, 40


def test_superposition_claims_read_the_layers():
    # layer 0: one neuron 0.5, sixteen 0.9 (superposition); layer 6: one neuron 0.88 ≈ sixteen 0.9 (dedicated)
    frame = pd.DataFrame([_rows("d", 0, 1, 0.5, 0.05), _rows("d", 0, 16, 0.9, 0.03),
                          _rows("d", 6, 1, 0.88, 0.04), _rows("d", 6, 16, 0.9, 0.03)])
    a1, a2 = superposition_claims(frame, _Cfg)
    assert (a1.verdict, a2.verdict) == (REPRODUCED, REPRODUCED) and not a1.size_note
    frame.loc[2, ["f1", "f1_low", "f1_high"]] = [0.6, 0.55, 0.65]  # now no layer has a dedicated neuron
    assert superposition_claims(frame, _Cfg)[1].verdict == NOT_REPRODUCED


def test_latent_claims_compare_latents_with_both_baselines():
    neurons = pd.DataFrame([_rows("d", 6, 1, 0.6, 0.05, precision=0.5)])
    resid = pd.DataFrame([_rows("d", 6, 1, 0.65, 0.05)])
    sae = pd.DataFrame([_rows("d", 6, 1, 0.9, 0.03, precision=0.9)])
    b, f = latent_claims(neurons, sae, resid, 6, _Cfg)
    assert (b.verdict, f.verdict) == (REPRODUCED, REPRODUCED)
    small = type("C", (), {"probe_examples": 240, "seeds": 1, "steer_samples": 20})
    assert "probe_examples = 240" in latent_claims(neurons, sae, resid, 6, small)[0].size_note


def test_a_feature_duplicated_into_two_directions_is_found_split(tmp_path):
    from monoscope.interpret.splitting import SplitConfig, Splitting, find_families
    from monoscope.sae import REGISTRY, SAEConfig

    torch.manual_seed(0)
    d, m = 16, 8
    small = REGISTRY["relu"](SAEConfig(architecture="relu", d_in=d, d_sae=m))
    large = REGISTRY["relu"](SAEConfig(architecture="relu", d_in=d, d_sae=2 * m))
    eye = torch.eye(d)
    with torch.no_grad():
        for sae in (small, large):
            sae.b_dec.zero_(), sae.b_enc.zero_()
        small.W_dec.copy_(eye[:m]), small.W_enc.copy_(eye[:m].T)
        # feature 0 becomes two large features (direction 0 tilted two ways), the others are kept one-to-one
        tilt = torch.stack([eye[0] + 0.3 * eye[m], eye[0] - 0.3 * eye[m]])
        w = torch.cat([tilt, eye[1:m], eye[m + 1:]])  # 2 + 7 + 7 rows: small feature j > 0 is large j + 1
        large.W_dec.copy_(w), large.W_enc.copy_(w.T)
    rows = torch.relu(torch.randn(4000, d))
    result = find_families(small, large, rows, SplitConfig(units=m, min_firings=5))
    fam = result.family_of(0)
    assert fam["splits"] and sorted(fam["members"]) == [0, 1] and fam["coverage"] > 0.9
    assert not result.family_of(3)["splits"] and result.family_of(3)["members"] == [4]
    assert result.summary["split"] == 1 and result.summary["tested"] == m
    result.save(tmp_path)
    assert Splitting.load(tmp_path).summary == result.summary


def test_json_results_fail_with_one_line_naming_the_fix(tmp_path):
    from monoscope.errors import MonoscopeError
    from monoscope.interpret.splitting import Splitting
    from monoscope.interpret.steering_demo import SteeringDemo

    with pytest.raises(MonoscopeError, match="splitting.json does not exist; rerun the split stage"):
        Splitting.load(tmp_path)
    (tmp_path / "steering.json").write_text('{"feature": 3}')  # required fields missing
    with pytest.raises(MonoscopeError, match="not a readable steering result .*rerun the steer stage"):
        SteeringDemo.load(tmp_path)
    (tmp_path / "steering.json").write_text("{not json")
    with pytest.raises(MonoscopeError, match="not a readable steering result"):
        SteeringDemo.load(tmp_path)


def test_explanation_claim_pairs_the_two_explainers_on_each_unit(tmp_path):
    import json

    from monoscope.report.claims import explanation_claims

    def rec(unit, llm, tok):
        cand = {"llm": {"explanation": "x", "status": "ok", "detection": {"accuracy": llm}},
                "tokens": {"explanation": "y", "status": "ok", "detection": {"accuracy": tok}}}
        return {"feature": unit, "explanation": "x", "status": "ok", "explained_by": "llm", "candidates": cand}
    path = tmp_path / "features.jsonl"
    path.write_text("".join(json.dumps(rec(u, 0.9, 0.6 + 0.01 * u)) + "\n" for u in range(5)))
    cfg = type("C", (), {"explain_score_examples": 20})
    [claim] = explanation_claims({"features": str(path)}, cfg)
    assert claim.verdict == REPRODUCED and "over 5 units" in claim.measured and not claim.size_note
    path.write_text("".join(json.dumps(rec(u, 0.5, 0.6 + 0.01 * u)) + "\n" for u in range(5)))
    assert explanation_claims({"features": str(path)}, cfg)[0].verdict == NOT_REPRODUCED


def test_saebench_table_averages_accuracy_over_datasets():
    """SAEBench's cells: mean over datasets of the mean-difference probe's accuracy at k, with the t interval
    over datasets; a k the run did not probe says so; the plot has one line per unit basis."""
    import pandas as pd

    from monoscope.report.findings import saebench_plot, saebench_probing

    def frame(acc_k1, acc_dense):
        rows = [{"dataset": d, "layer": 6, "control": "none", "method": "mean_diff", "k": 1, "accuracy": a}
                for d, a in zip("abc", acc_k1)]
        rows += [{"dataset": d, "layer": 6, "control": "none", "method": "dense", "k": 0, "accuracy": a}
                 for d, a in zip("abc", acc_dense)]
        rows.append({"dataset": "a", "layer": 6, "control": "shuffled", "method": "mean_diff", "k": 1, "accuracy": 0.0})
        rows.append({"dataset": "a", "layer": 3, "control": "none", "method": "mean_diff", "k": 1, "accuracy": 0.0})
        return pd.DataFrame(rows)

    table = saebench_probing({"neurons": frame([0.7, 0.8, 0.9], [1.0, 1.0, 1.0]), "none": pd.DataFrame()}, 6)
    assert len(table) == 1 and table.loc[0, "datasets"] == 3
    # mean 0.8, sd 0.1, t(0.975, 2) = 4.303: half-width 0.248, the upper end clipped at 1
    assert table.loc[0, "k=1"] == "0.800 [0.552, 1.000]" and table.loc[0, "dense"] == "1.000 [1.000, 1.000]"
    assert table.loc[0, "k=2"] == "not run" and table.loc[0, "k=5"] == "not run"
    assert saebench_plot({"neurons": frame([0.7, 0.8, 0.9], [1, 1, 1])}, 6).startswith("data:image/png;base64,")
    assert saebench_plot({"none": pd.DataFrame()}, 6) is None
