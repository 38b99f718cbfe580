"""Ground-truth metrics (monoscope.synth.metrics): exact answers on hand-made SAEs, and agreement with
SAELens's eval_sae_on_synthetic_data on the very same samples of a SAELens SyntheticModel."""
from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from monoscope.errors import MonoscopeError
from monoscope.sae import SAEConfig, build_sae, save_sae
from monoscope.synth.metrics import GroundTruthMetrics, ground_truth_metrics
from test_sae_io import _saelens_python

F, D, N, ACTIVE = 12, 16, 600, 3  # true features, hidden dim, samples, features active per sample


@pytest.fixture(scope="module")
def truth():
    """Orthonormal true features, a bias, and samples with exactly ACTIVE features on (magnitudes 0.5..1.5).

    The features are signed coordinate axes, so an exact encoder gives exact zeros (a rotated basis leaves
    ~1e-7 round-off in f, which counts as firing, in SAELens's definition too)."""
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (F, 1), generator=g) * 2.0 - 1
    vectors = torch.eye(D)[torch.randperm(D, generator=g)[:F]] * signs  # [F, D], orthonormal rows
    bias = torch.randn(D, generator=g)
    on = torch.rand(N, F, generator=g).argsort(1)[:, :ACTIVE]
    acts = torch.zeros(N, F).scatter_(1, on, 0.5 + torch.rand(N, ACTIVE, generator=g))
    return vectors, bias, acts, acts @ vectors + bias


def exact_sae(vectors, bias, arch="relu", dec_scale=1.0):
    """An SAE whose encoder reads the true features exactly: f = a for x = a·V + b (orthonormal V)."""
    sae = build_sae(SAEConfig(arch, d_in=D, d_sae=vectors.shape[0], k=ACTIVE + 2 if arch == "topk" else None))
    with torch.no_grad():
        sae.W_dec.copy_(vectors * dec_scale)
        sae.W_enc.copy_(vectors.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(bias)
    return sae.eval()


def score(sae, truth, batch=97):
    vectors, _, acts, hidden = truth
    return ground_truth_metrics(sae, vectors, ((hidden[i:i + batch], acts[i:i + batch]) for i in range(0, N, batch)))


def total_variance(x):
    return (x - x.mean(0)).pow(2).sum(1).mean().item()


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_exact_decoder_scores_perfectly(truth, arch):
    m = score(exact_sae(truth[0], truth[1], arch), truth)
    assert isinstance(m, GroundTruthMetrics)
    d = m.to_dict()
    assert all(type(v) in (int, float) for v in d.values()), d
    for name in ("mcc", "uniqueness", "precision", "recall", "f1", "accuracy", "explained_variance", "shrinkage"):
        assert d[name] == pytest.approx(1.0, abs=1e-5), name
    assert d["l0"] == d["true_l0"] == ACTIVE and d["dead_latents"] == 0 and d["num_samples"] == N


def test_permuted_decoder_is_still_perfect(truth):
    vectors, bias = truth[:2]
    perm = torch.randperm(F, generator=torch.Generator().manual_seed(1))
    d = score(exact_sae(vectors[perm], bias), truth).to_dict()
    for name in ("mcc", "uniqueness", "precision", "recall", "f1", "accuracy", "explained_variance"):
        assert d[name] == pytest.approx(1.0, abs=1e-5), name


def test_dead_latent(truth):
    """Latent 0 points the wrong way: never fires, still matches feature 0 in |cos|."""
    vectors, bias, acts, hidden = truth
    sae = exact_sae(vectors, bias)
    with torch.no_grad():
        sae.W_enc[:, 0] *= -1
        sae.W_dec[0] *= -1
    d = score(sae, truth).to_dict()
    assert d["dead_latents"] == 1
    assert d["mcc"] == pytest.approx(1.0) and d["uniqueness"] == 1.0
    for name in ("precision", "recall", "f1"):  # 0 for the dead latent, 1 for the others
        assert d[name] == pytest.approx((F - 1) / F), name
    rate0 = (acts[:, 0] > 0).float().mean().item()
    assert d["accuracy"] == pytest.approx(1 - rate0 / F)
    assert d["l0"] == pytest.approx(ACTIVE - rate0)
    assert d["explained_variance"] == pytest.approx(1 - acts[:, 0].pow(2).mean().item() / total_variance(hidden))


def test_duplicate_latent(truth):
    """Latents 0 and 1 both read feature 0: uniqueness and MCC lose one in F, detection loses nothing."""
    vectors, bias, acts, hidden = truth
    dup = vectors.clone()
    dup[1] = vectors[0]
    d = score(exact_sae(dup, bias), truth).to_dict()
    assert d["uniqueness"] == pytest.approx((F - 1) / F)
    assert d["mcc"] == pytest.approx((F - 1) / F, abs=1e-6)  # one latent is left with an orthogonal feature
    assert d["precision"] == d["recall"] == d["f1"] == pytest.approx(1.0)
    resid = (acts[:, 0].pow(2) + acts[:, 1].pow(2)).mean().item()  # x̂ = x + a0·v0 − a1·v1
    assert d["explained_variance"] == pytest.approx(1 - resid / total_variance(hidden), rel=1e-5)


def test_shrinkage_of_a_scaled_decoder(truth):
    vectors, bias, acts, hidden = truth
    sae = exact_sae(vectors, torch.zeros(D), dec_scale=0.5)
    x = acts @ vectors  # no bias, so x̂ = x / 2 exactly
    d = ground_truth_metrics(sae, vectors, [(x, acts)]).to_dict()
    assert d["shrinkage"] == pytest.approx(0.5)
    assert d["explained_variance"] == pytest.approx(1 - 0.25 * x.pow(2).sum(1).mean().item() / total_variance(x))
    assert d["mcc"] == pytest.approx(1.0) and d["f1"] == pytest.approx(1.0)


def test_batching_does_not_change_the_numbers(truth):
    g = torch.Generator().manual_seed(2)
    sae = exact_sae(truth[0] + 0.3 * torch.randn(F, D, generator=g), truth[1])
    whole = ground_truth_metrics(sae, truth[0], [(truth[3], truth[2])]).to_dict()
    for batch in (1, 37, N):
        parts = score(sae, truth, batch).to_dict()
        # float32 matmuls of 1 and of N rows may take different BLAS kernels (~1e-8 apart); a batching bug in
        # the float64 accumulation would be orders of magnitude larger
        assert parts == pytest.approx(whole, rel=1e-6, abs=1e-7), batch


def test_bad_input_says_what_was_wrong(truth):
    vectors, bias, acts, hidden = truth
    sae = exact_sae(vectors, bias)
    with pytest.raises(MonoscopeError, match="feature_vectors"):
        ground_truth_metrics(sae, vectors[:, :-1], [(hidden, acts)])
    with pytest.raises(MonoscopeError, match=r"batch 0.*\[B, 12\]"):
        ground_truth_metrics(sae, vectors, [(hidden, acts[:, :-1])])
    with pytest.raises(MonoscopeError, match="no samples"):
        ground_truth_metrics(sae, vectors, [])


# ---------------------------------------------------------------------------------------------------------
# SAELens agrees on the same samples

SAELENS_EVAL = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import save_file
    from sae_lens import SAE
    from sae_lens.synthetic import HierarchyConfig, SyntheticModel, SyntheticModelConfig, eval_sae_on_synthetic_data
    from sae_lens.synthetic.synthetic_model import LowRankCorrelationConfig, OrthogonalizationConfig

    out, n, batch, folders = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    torch.manual_seed(0)
    model = SyntheticModel(SyntheticModelConfig(
        num_features=256, hidden_dim=64, seed=7, std_firing_magnitudes=0.2,
        hierarchy=HierarchyConfig(total_root_nodes=16, branching_factor=3, max_depth=2,
                                  mutually_exclusive_portion=0.5),
        correlation=LowRankCorrelationConfig(rank=8, correlation_scale=0.1, seed=1),
        orthogonalization=OrthogonalizationConfig(num_steps=50)))
    with torch.no_grad():
        acts = model.activation_generator.sample(n)
        hidden = model.feature_dict(acts)
    fd = model.feature_dict
    save_file({"acts": acts.contiguous(), "hidden": hidden.contiguous(),
               "vectors": fd.feature_vectors.detach().contiguous(), "bias": fd.bias.detach().contiguous()},
              out + "/samples.safetensors")
    print("ready", flush=True)
    sys.stdin.readline()  # the SAEs are written now

    class Replay:  # hands SAELens the dumped samples, in order
        pos = 0
        def sample(self, b):
            self.pos += b
            return acts[self.pos - b:self.pos]

    results = {}
    for folder in folders:
        replay = Replay()
        r = eval_sae_on_synthetic_data(SAE.load_from_disk(folder, device="cpu"), fd, replay,
                                       num_samples=n, batch_size=batch)
        assert replay.pos == n, replay.pos
        results[folder.rstrip("/").split("/")[-1]] = r.to_log_dict()
    json.dump(results, open(out + "/saelens.json", "w"))
""")

# SAELens's key -> ours
SAELENS_NAMES = {"true_l0": "true_l0", "sae_l0": "l0", "dead_latents": "dead_latents", "shrinkage": "shrinkage",
                 "explained_variance": "explained_variance", "mcc": "mcc", "uniqueness": "uniqueness",
                 "classification/precision": "precision", "classification/recall": "recall",
                 "classification/f1_score": "f1", "classification/accuracy": "accuracy"}


def noisy_sae(arch: str, d_sae: int, vectors, bias, noise: float, seed: int):
    """Decoder rows = true features (permuted, some repeated) plus noise, so every metric is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    nf, d = vectors.shape
    rows = torch.cat([torch.randperm(nf, generator=g), torch.randint(0, nf, (max(0, d_sae - nf),), generator=g)])
    w = vectors[rows[:d_sae]] + noise * torch.randn(d_sae, d, generator=g) / math.sqrt(d)
    w = w / w.norm(dim=1, keepdim=True)
    sae = build_sae(SAEConfig(arch, d_in=d, d_sae=d_sae, k=4 if arch == "topk" else None))
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T + 0.5 * noise * torch.randn(d, d_sae, generator=g) / math.sqrt(d))
        sae.b_enc.copy_(-0.05 + 0.05 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(bias + 0.05 * torch.randn(d, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(0.4 * torch.rand(d_sae, generator=g))
            sae.threshold[:3] = 100.0  # three dead latents
    return sae.eval()


def d_sae_of(specs, name):
    return specs[name][1]


def test_agrees_with_saelens(tmp_path):
    py = _saelens_python()
    if py is None:
        pytest.skip("sae-lens interpreter not found (looked where tests/test_sae_io.py looks: "
                    "MONOSCOPE_SAELENS_PYTHON, the current interpreter, venv-saelens in the monoscope cache)")
    n, batch = 3000, 700
    specs = {"topk": ("topk", 320, 0.4), "jumprelu": ("jumprelu", 200, 0.6), "relu": ("relu", 256, 0.8)}
    (tmp_path / "run.py").write_text(SAELENS_EVAL)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"})
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([py, str(tmp_path / "run.py"), str(tmp_path), str(n), str(batch),
                                 *[str(tmp_path / name) for name in specs]],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            assert proc.stdout.readline().strip() == "ready", (tmp_path / "stderr.txt").read_text()[-3000:]
            data = load_file(str(tmp_path / "samples.safetensors"))
            for name, (arch, d_sae, noise) in specs.items():
                save_sae(noisy_sae(arch, d_sae, data["vectors"], data["bias"], noise, seed=d_sae), tmp_path / name)
            proc.stdin.write("go\n")
            proc.stdin.close()
            assert proc.wait(timeout=120) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    theirs = json.loads((tmp_path / "saelens.json").read_text())
    hidden, acts = data["hidden"], data["acts"]
    from monoscope.sae import load_sae

    for name in specs:
        sae = load_sae(tmp_path / name)
        ours = ground_truth_metrics(sae, data["vectors"], ((hidden[i:i + 512], acts[i:i + 512])
                                                           for i in range(0, n, 512))).to_dict()
        assert set(theirs[name]) == set(SAELENS_NAMES), sorted(theirs[name])
        for key, mine in SAELENS_NAMES.items():
            expected = theirs[name][key]
            assert ours[mine] == pytest.approx(expected, abs=1e-3, rel=1e-3), (name, mine, ours[mine], expected)
        # the SAEs are not trivial: something is lost on every count SAELens reports
        assert 0 < ours["f1"] < 0.95 and 0 < ours["mcc"] < 0.99 and ours["explained_variance"] < 0.99, (name, ours)
        assert ours["num_samples"] == n
        assert ours["dead_latents"] >= (3 if name == "jumprelu" else 0)
        assert ours["uniqueness"] < 1 or d_sae_of(specs, name) <= 256
