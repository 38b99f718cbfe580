"""`monoscope run` end to end on a tiny model: every report section filled from real results."""
import json
import re

import pytest

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.pipeline import RunConfig, load_run_config, run_pipeline

TINY = """
model = "tiny-llama"
layer = 1
tokens = 4096
val_tokens = 512
context_length = 32
d_sae = 128
k_values = [8]
target_l0_values = [8.0]
epochs = 2
batch_size = 512
lm_contexts = 4
probe_datasets = ["is_python_code", "lang:fr"]
probe_ks = [1, 2, 4, 16]
probe_examples = 60
probe_max_length = 32
explain_features = 2
explain_neurons = 2
steer_samples = 4
steer_tokens = 6
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg_path = out / "run.toml"
    cfg_path.write_text(TINY)
    assert main(["run", "--config", str(cfg_path), "--out", str(out / "r")]) == 0
    return out / "r"


def test_report_sections_filled(tiny_run):
    page = (tiny_run / "report.html").read_text()
    for title in ("Where features have dedicated neurons", "Optimal sparse probing vs heuristics",
                  "SAE latents vs neurons at layer 1", "Fidelity / sparsity frontier of the SAEs",
                  "Most interpretable features", "Steering", "Run settings, sizes, timings and versions"):
        assert title in page
    section = lambda t: page.split(t, 1)[1].split("<section>", 1)[0]
    assert "data:image/png;base64" in section("Where features have dedicated neurons")
    assert "topk" in section("Fidelity / sparsity frontier") and "jumprelu" in section("Fidelity / sparsity frontier")
    assert "SAE latents k=1" in section("SAE latents vs neurons")
    saebench = section("SAE latents vs neurons").split("SAEBench", 1)[1]  # tiny run: k = 5 not probed
    assert re.search(r"<td>SAE latents</td>\s*<td>\d+</td>\s*<td>[\d.]+ \[", saebench) and "not run" in saebench
    assert re.search(r"<td>osp</td>", section("Optimal sparse probing"))
    assert "(no rows)" not in section("Where features have dedicated neurons")
    assert "steered" in section("Steering")
    assert (tiny_run / "browser" / "index.html").exists() and (tiny_run / "browser_neurons" / "index.html").exists()
    assert "http://" not in page and "https://" not in page  # self-contained
    assert json.loads((tiny_run / "run_config.json").read_text())["model"] == "tiny-llama"


def test_steering_demo_measures_a_concept_feature(tiny_run):
    from monoscope.interpret.steering_demo import concept_candidates

    steering = json.loads((tiny_run / "steer" / "steering.json").read_text())
    eff = steering["effect"]
    for arm in ("default", "steered"):
        assert {"mean_activation", "distinct_tokens", "keyword_rate"} <= set(eff[arm])
        assert len(steering["texts"][arm]) == eff[arm]["keyword_rate"]["n"]
    assert steering["mode"] == "clamp" and steering["keywords"] and steering["screen"]["candidates"] >= 1
    assert 0.0 <= eff["keyword_p_value"] <= 1.0 and steering["screen"]["activation"] >= 0.0
    base = steering["baseline"]  # the difference-of-means direction, same prompts, seeds and sample count
    assert base["steered"]["keyword_rate"]["n"] == eff["steered"]["keyword_rate"]["n"] and base["norm"] > 0
    for arm in (eff["default"], eff["steered"], base["steered"]):  # the concept probe judges every arm's text
        assert 0.0 <= arm["concept_probe"]["mean"] <= 1.0
    assert "probe_difference" in eff and "probe_difference" in base and base["concept_probe"]["n_positive"] > 0
    assert -1.0 <= base["cosine_with_feature"] <= 1.0 and base["n_positive"] >= 1 and base["n_negative"] >= 1
    assert "difference of means" in (tiny_run / "report.html").read_text()
    found = concept_candidates(str(tiny_run / "stats" / "features"), common={"the"})
    assert all(c["share"] >= 0.3 and c["word"] != "the" and "the" not in c["keywords"] for c in found)


def test_common_words_and_keywords():
    from monoscope.interpret.steering_demo import common_words, feature_keywords

    texts = ["the cat sat", "the dog ran", "a Korean poem", "the end"]
    assert common_words(texts, max_share=0.5) == {"the"}
    rec = {"top": [{"tokens": [" North", " Korea"], "focus": 1}] * 3 + [{"tokens": [" the"], "focus": 0}],
           "logits": {"pos": [[" Koreans", 3.0], ["jong", 2.0], ["7", 1.0], [" along", 0.5]]}}
    # promoted tokens count only as inflections of the top examples' words, never on their own
    assert feature_keywords(rec, common={"the"}) == ["korea", "koreans"]


def test_rerun_skips_finished_stages(tiny_run, capsys):
    cfg = load_run_config(tiny_run / "run.toml")
    run_pipeline(cfg, tiny_run)
    log = capsys.readouterr().out
    for stage in ("extract", "saes", "probe", "stats", "explain", "steer"):
        assert f"{stage}: done before, skipped" in log


def test_bad_config_fails_before_work(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "tiny-llama"\nlayers = 3\n')
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown key(s) ['layers']" in capsys.readouterr().err
    with pytest.raises(MonoscopeError, match="too small to train"):
        run_pipeline(RunConfig(model="tiny-llama", tokens=100), tmp_path / "o2")
    with pytest.raises(MonoscopeError, match="lr must be positive"):
        run_pipeline(RunConfig(model="tiny-llama", lr=0.0), tmp_path / "o2")
    with pytest.raises(MonoscopeError, match="unknown hook"):
        run_pipeline(RunConfig(model="tiny-llama", layer=9), tmp_path / "o3")
    with pytest.raises(MonoscopeError, match="cannot load model"):
        run_pipeline(RunConfig(model="no-such-model"), tmp_path / "o4")
    assert not (tmp_path / "o2" / "extract").exists()


def _rerun(folder, capsys, **changes):
    """Run ``folder`` again with ``changes`` to its settings; return the stages that ran."""
    cfg = load_run_config(folder / "run.toml", **changes)
    run_pipeline(cfg, folder)
    log = capsys.readouterr().out
    return [s for s in ("extract", "saes", "probe", "stats", "explain", "steer", "report") if f"{s}: running" in log]


def test_changes_rerun_exactly_downstream(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    capsys.readouterr()
    assert _rerun(run, capsys, probe_ks=[1, 2]) == ["probe", "report"]
    assert _rerun(run, capsys, probe_ks=[1, 2], d_sae=64) == ["saes", "probe", "stats", "explain", "steer", "report"]
    stats = json.loads((run / "stats" / "features" / "stats.json").read_text())
    assert stats["n_features"] == 64
    explained = [json.loads(line) for line in (run / "explain" / "features.jsonl").read_text().splitlines()]
    assert explained and all(r["feature"] < 64 for r in explained)
    assert json.loads((run / "steer" / "steering.json").read_text())["feature"] < 64
    assert len(list((run / "browser" / "features").glob("*.html"))) == 64
    assert _rerun(run, capsys, probe_ks=[1, 2], d_sae=64) == []


def test_copied_run_folder_uses_its_own_files(tiny_run, tmp_path, capsys):
    import shutil

    copy, moved = tmp_path / "copy", tmp_path / "moved"
    shutil.copytree(tiny_run, copy)
    capsys.readouterr()
    assert _rerun(copy, capsys) == []
    for path in copy.rglob("*"):  # only probe.json, the probing config as it was given, may name the original
        if path.suffix in (".json", ".csv", ".jsonl", ".html", ".js", ".toml") and path.name != "probe.json":
            assert str(tiny_run) not in path.read_text(errors="replace"), path
    shutil.move(copy, moved)
    (moved / "stats" / "features" / "contexts.jsonl").unlink()  # a damaged stage runs again, and only those after
    ran = _rerun(moved, capsys)
    assert ran[0] == "stats" and not {"extract", "saes", "probe"} & set(ran)
    assert (moved / "stats" / "features" / "contexts.jsonl").exists()


def test_research_profile_is_a_preset_that_flags_override(tmp_path):
    research = load_run_config(None, profile="research")
    assert (research.tokens, research.seeds, research.extra_d_sae, research.probe_examples) == (
        1_048_576, 3, (16_384,), 1000)
    assert research.probe_datasets and all(n.startswith(("lang:", "code:")) for n in research.probe_datasets)
    assert load_run_config(None, profile="research", tokens=2048).tokens == 2048
    (tmp_path / "r.toml").write_text('profile = "research"\nseeds = 2\n')
    from_file = load_run_config(tmp_path / "r.toml")
    assert (from_file.seeds, from_file.tokens) == (2, 1_048_576)
    assert load_run_config(None).seeds == 1 and load_run_config(None).extra_d_sae == ()
    with pytest.raises(MonoscopeError, match="unknown profile 'fast'; choose from default, research"):
        load_run_config(None, profile="fast")


def test_command_line_names_the_profile_and_every_changed_setting():
    from monoscope.pipeline import command_line

    cfg = load_run_config(None, profile="research", seeds=2, k_values=[16, 32])
    line = command_line(cfg, "runs/r")
    assert line == "monoscope run --profile research --seeds 2 --k-values 16 32 --out runs/r"
    assert command_line(load_run_config(None), "runs/default") == "monoscope run --out runs/default"


def test_seeds_and_a_larger_size_give_intervals_and_splitting(tmp_path):
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(TINY + "seeds = 2\nextra_d_sae = [256]\narchitectures = [\"topk\"]\n")
    out = tmp_path / "r"
    assert main(["run", "--config", str(cfg_path), "--out", str(out)]) == 0
    saes = json.loads((out / "saes" / "stage.json").read_text())["data"]
    assert set(saes["larger"]) == {"256"} and saes["larger"]["256"].startswith("d256/")
    assert {r["seed"] for r in saes["table"]} == {0, 1} and {r["d_sae"] for r in saes["table"]} == {128, 256}
    split = json.loads((out / "split" / "d256" / "splitting.json").read_text())
    assert split["small_d_sae"] == 128 and split["large_d_sae"] == 256 and split["summary"]["tested"] > 0
    findings = (out / "findings.md").read_text()
    assert "| e | Features of the main SAE split into families in the 256-latent SAE" in findings
    assert "| topk k 8, d_sae 128 | 2 |" in findings  # the main SAE over its two seeds, with intervals
    assert re.search(r"\| extract \| \d+ \| [\d,]+ activations extracted \| [\d,.]+ \|", findings)
    assert re.search(r"\| steer \| \d+ \| [\d,]+ candidate features screened \|", findings)
    assert re.search(r"\| 2 \| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \|", findings)
    assert "Claims, baselines and verdicts" in (out / "report.html").read_text()
    tested = split["families"][0]
    page = (out / "browser" / "features" / f"{tested['unit']}.html").read_text()
    assert "Splits into (256-latent SAE)" in page and f"{round(100 * tested['coverage'])} %" in page
