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


def test_screening_copy_is_a_bf16_copy_that_leaves_the_model_alone():
    from monoscope.models import screening_copy, tiny_model

    lm = tiny_model("llama")
    before = [p.detach().clone() for p in lm.model.parameters()]
    fast = screening_copy(lm)
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(lm.model.parameters(), before))
    if fast is not lm:  # bf16 is native here: a copy, same vocabulary, logits close to the fp32 ones
        assert next(fast.model.parameters()).dtype == torch.bfloat16 and fast.tokenizer is lm.tokenizer
        ids = torch.tensor([[1, 5, 9, 3]])
        with torch.no_grad():
            want, got = lm.model(ids).logits, fast.model(ids).logits.float()
        assert torch.allclose(got, want, atol=0.05 * want.abs().max().item())
