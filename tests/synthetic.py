"""Small synthetic artifacts shared by several test files."""
import torch

from monoscope.store import StoreWriter


def random_store(folder, hook: str = "layers.1.resid_post", d: int = 16, ctx_len: int = 12, n_contexts: int = 40,
                 seed: int = 0):
    """A finished store of random activations from 'tiny-llama' contexts of ``ctx_len`` rows (BOS dropped)."""
    g = torch.Generator().manual_seed(seed)
    w = StoreWriter.open(folder, model="tiny-llama", model_fingerprint="fp", hooks={hook: d}, shard_rows=500,
                         meta={"config": {"keep_bos": False, "context_length": ctx_len + 1}})
    for c in range(0, n_contexts, 10):
        n = 10 * ctx_len
        ctx = torch.arange(c, c + 10).repeat_interleave(ctx_len)
        w.append({hook: torch.randn(n, d, generator=g)}, torch.randint(3, 259, (n,), generator=g), ctx // 3,
                 torch.arange(1, ctx_len + 1).repeat(10), ctx)
    w.finish()
    return folder
