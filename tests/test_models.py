"""Model identity: fingerprints follow the weights, not where they were loaded from."""
import torch


def test_fingerprint_ignores_where_the_model_was_loaded_from(tmp_path):
    from monoscope.models import _fingerprint, tiny_model

    lm = tiny_model("llama")
    before = _fingerprint(lm.model, "a")
    lm.model.config._name_or_path = str(tmp_path / "elsewhere")
    assert _fingerprint(lm.model, "b") == before
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[0, 0] += 1.0
    assert _fingerprint(lm.model, "b") != before
