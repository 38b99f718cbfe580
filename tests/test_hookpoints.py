"""Hook tables of every family checked against hand computations on tiny random models."""
import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.hookpoints import capture, edit, hook_points, resolve, run_with_capture
from monoscope.models import TINY_FAMILIES, tiny_model

FAMILIES = list(TINY_FAMILIES)


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return tiny_model(request.param)


def _all(lm, ids):
    return run_with_capture(lm.model, list(hook_points(lm.model)), ids, stop=False)


def test_residual_identities(lm):
    ids = torch.randint(3, 250, (2, 12))
    a = _all(lm, ids)
    hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(lm.n_layers):
        pre, post = a[f"layers.{i}.resid_pre"], a[f"layers.{i}.resid_post"]
        torch.testing.assert_close(post, pre + a[f"layers.{i}.attn_out"] + a[f"layers.{i}.mlp_out"],
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pre, hidden[i], atol=1e-6, rtol=1e-6)
        if i + 1 < lm.n_layers:
            torch.testing.assert_close(a[f"layers.{i + 1}.resid_pre"], post)


def test_mlp_neurons_by_hand(lm):
    """Recompute the MLP hidden activations from the block's weights and the captured residual."""
    ids = torch.randint(3, 250, (1, 9))
    a = _all(lm, ids)
    fam = lm.family
    for i in range(lm.n_layers):
        if fam == "gpt2":
            block = lm.model.transformer.h[i]
            mid = a[f"layers.{i}.resid_pre"] + a[f"layers.{i}.attn_out"]
            expect = block.mlp.act(block.mlp.c_fc(block.ln_2(mid)))
            out = block.mlp.c_proj(expect)
        elif fam == "gpt_neox":  # parallel residual: the MLP reads the block input
            block = lm.model.gpt_neox.layers[i]
            expect = block.mlp.act(block.mlp.dense_h_to_4h(block.post_attention_layernorm(a[f"layers.{i}.resid_pre"])))
            out = block.mlp.dense_4h_to_h(expect)
        else:
            block = lm.model.model.layers[i]
            mid = a[f"layers.{i}.resid_pre"] + a[f"layers.{i}.attn_out"]
            norm = block.pre_feedforward_layernorm if hasattr(block, "pre_feedforward_layernorm") else block.post_attention_layernorm
            h = norm(mid)
            expect = block.mlp.act_fn(block.mlp.gate_proj(h)) * block.mlp.up_proj(h)
            out = block.mlp.down_proj(expect)
            if hasattr(block, "post_feedforward_layernorm"):
                out = block.post_feedforward_layernorm(out)
        torch.testing.assert_close(a[f"layers.{i}.mlp_neurons"], expect, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a[f"layers.{i}.mlp_out"], out, atol=1e-5, rtol=1e-4)


def test_stop_after_deepest_hook(lm):
    ids = torch.randint(3, 250, (1, 8))
    calls = []
    blocks = list(hook_points(lm.model).values())
    handles = [p.module.register_forward_hook(lambda *_, i=p.layer: calls.append(i))
               for p in blocks if p.kind == "resid_post"]
    try:
        acts = run_with_capture(lm.model, ["layers.0.mlp_out"], ids)
    finally:
        for h in handles:
            h.remove()
    assert set(acts) == {"layers.0.mlp_out"}
    assert calls == []  # block 0 never finished: stopped inside it, later blocks never ran


def test_edit_replaces_activation(lm):
    ids = torch.randint(3, 250, (1, 8))
    clean = lm.model(input_ids=ids).logits
    with edit(lm.model, "layers.1.resid_pre", lambda t: t):
        same = lm.model(input_ids=ids).logits
    torch.testing.assert_close(clean, same)
    with edit(lm.model, "layers.1.mlp_neurons", torch.zeros_like):
        a = run_with_capture(lm.model, ["layers.1.mlp_neurons", "layers.1.mlp_out"], ids)
        ablated = lm.model(input_ids=ids).logits
    assert torch.count_nonzero(a["layers.1.mlp_neurons"]) == 0  # hooks run in order: capture sees the edit
    assert not torch.allclose(clean, ablated)


def test_unknown_hook_lists_valid_names(lm):
    with pytest.raises(MonoscopeError, match=r"valid hooks are layers\.\{0\.\.2\}"):
        resolve(lm.model, "layers.9.resid_post")
    with pytest.raises(MonoscopeError, match="names look like"):
        resolve(lm.model, "blocks.0.hook_resid_post")


def test_capture_context_manager(lm):
    ids = torch.randint(3, 250, (1, 6))
    with capture(lm.model, ["layers.0.resid_post"], stop=False) as acts:
        lm.model(input_ids=ids)
    assert acts["layers.0.resid_post"].shape == (1, 6, lm.d_model)

