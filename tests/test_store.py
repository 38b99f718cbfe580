"""Activation store: round trips, the shuffled reader's guarantees, crash-resume, corruption, errors."""
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from monoscope.errors import MonoscopeError
from monoscope.store import ActivationStore, StoreWriter

# Deterministic synthetic contexts, shared by the in-process reference and the killed subprocess.
SYNTH = '''
import numpy as np, torch
HOOKS = {"layers.0.resid_post": 6, "layers.0.mlp_out": 3}

def context(c):
    """Rows of context c: 3..9 rows; column 0 of the first hook holds a row-unique id."""
    g = np.random.default_rng(c)
    n = 3 + (c * 5) % 7
    acts = {h: torch.from_numpy(g.standard_normal((n, d)).astype(np.float32)) for h, d in HOOKS.items()}
    acts["layers.0.resid_post"][:, 0] = torch.arange(n) + 1000 * c
    pos = np.arange(1, n + 1)
    return acts, g.integers(0, 50000, n), np.full(n, c // 4), pos, np.full(n, c)
'''
ns: dict = {}
exec(SYNTH, ns)
HOOKS, context = ns["HOOKS"], ns["context"]
ID_HOOK = "layers.0.resid_post"


def write_store(folder, n_contexts=60, dtype="float32", shard_rows=32, **kw):
    w = StoreWriter.open(folder, model="synthetic", model_fingerprint="fp0", hooks=HOOKS, dtype=dtype,
                         shard_rows=shard_rows, meta={"corpus": "synthetic"}, **kw)
    for c in range(w.contexts_done, n_contexts):
        w.append(*context(c))
    w.finish({"note": "done"})
    return ActivationStore(folder)


def reference(n_contexts):
    parts = [context(c) for c in range(n_contexts)]
    acts = {h: torch.cat([p[0][h] for p in parts]) for h in HOOKS}
    cols = [np.concatenate([p[i] for p in parts]) for i in range(1, 5)]
    return acts, cols


def ids_store(folder, n=3000, shard_rows=250):
    """A float32 store whose single hook's column 0 is the global row index."""
    w = StoreWriter.open(folder, model="m", model_fingerprint="f", hooks={"h": 2}, shard_rows=shard_rows)
    for c in range(0, n, 10):
        rows = torch.stack([torch.arange(c, c + 10).float(), torch.zeros(10)], 1)
        w.append({"h": rows}, np.zeros(10), np.zeros(10), np.arange(10), np.full(10, c // 10))
    w.finish()
    return ActivationStore(folder)


def seen(batches):
    return torch.cat([b[:, 0] for b in batches]).long().numpy()


# --------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    store = write_store(tmp_path / "s", dtype=dtype)
    acts, cols = reference(60)
    cast = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    assert store.num_rows == len(cols[0]) and store.contexts_done == 60 and store.finished
    assert store.num_shards > 3 and store.meta == {"corpus": "synthetic", "note": "done"}
    for h in HOOKS:
        want = acts[h].to(cast).float()
        got = torch.cat(list(store.iter_rows(h, batch_size=37)))
        assert got.dtype == torch.float32 and torch.equal(got, want)
        idx = np.random.default_rng(0).integers(0, store.num_rows, 200)
        assert torch.equal(store.rows(idx, h), want[idx])
        assert torch.equal(torch.cat(list(store.batches(h, 50, shuffle=False))), want)
    for got, want in zip((store.token_ids(), store.doc_ids(), store.positions(), store.context_ids()), cols):
        assert np.array_equal(got, want)
    assert store.token_ids().dtype == np.int32 and store.doc_ids().dtype == np.int64
    # shards are plain safetensors files that the reference library reads too
    first = load_file(str(tmp_path / "s" / store.shards[0]["file"]))
    n0 = store.shards[0]["rows"]
    assert torch.equal(first[ID_HOOK].float(), acts[ID_HOOK][:n0].to(cast).float())
    store.verify()
    store.check_finite()
    text = store.describe()
    assert "synthetic" in text and "layers.0.mlp_out (d=3)" in text and dtype in text


def test_shards_end_on_context_boundaries(tmp_path):
    store = write_store(tmp_path / "s", shard_rows=20)
    ctx = store.context_ids()
    for s, sh in zip(store.offsets[1:-1], store.shards[1:]):
        assert ctx[s - 1] != ctx[s]  # a context never straddles two shards
        assert sh["contexts"][0] == ctx[s]
    assert all(sh["rows"] <= 20 for sh in store.shards[:-1])


def test_hook_resolution_and_bounds(tmp_path):
    store = write_store(tmp_path / "s", n_contexts=5)
    with pytest.raises(MonoscopeError, match="several hooks"):
        store.d()
    with pytest.raises(MonoscopeError, match="no hook 'nope'.*layers.0.resid_post"):
        store.rows([0], "nope")
    with pytest.raises(MonoscopeError, match=r"\[0, "):
        store.rows([store.num_rows], ID_HOOK)
    assert store.d("layers.0.mlp_out") == 3


# --------------------------------------------------------------------------------------- shuffled reader

def test_shuffle_covers_each_row_once_and_is_deterministic(tmp_path):
    store = ids_store(tmp_path / "s")
    n = store.num_rows
    kw = dict(batch_size=64, buffer_rows=512)
    e0 = list(store.batches(seed=1, epoch=0, **kw))
    assert all(len(b) == 64 for b in e0[:-1]) and len(e0[-1]) == n % 64
    assert np.array_equal(np.sort(seen(e0)), np.arange(n))
    assert not np.array_equal(seen(e0), np.arange(n))  # actually shuffled
    assert np.array_equal(seen(e0), seen(store.batches(seed=1, epoch=0, **kw)))  # same seed, same order
    e1 = seen(store.batches(seed=1, epoch=1, **kw))
    assert np.array_equal(np.sort(e1), np.arange(n)) and not np.array_equal(e1, seen(e0))
    assert not np.array_equal(seen(store.batches(seed=2, epoch=0, **kw)), seen(e0))
    # a batch mixes rows from far apart (not just one shard)
    assert np.ptp(seen(e0[:1])) > 1000
    # with_indices reports the global row of each output row
    for x, idx in store.batches(seed=1, with_indices=True, **kw):
        assert torch.equal(x[:, 0].long(), idx)
    # drop_last drops only the final partial batch
    dl = list(store.batches(seed=1, drop_last=True, **kw))
    assert len(dl) == n // 64 and all(len(b) == 64 for b in dl)


def test_ranks_partition_the_epoch(tmp_path):
    store = ids_store(tmp_path / "s", n=3010, shard_rows=170)
    kw = dict(batch_size=32, buffer_rows=256, seed=3, epoch=2)
    parts = [seen(store.batches(rank=r, world_size=3, **kw)) for r in range(3)]
    allrows = np.concatenate(parts)
    assert np.array_equal(np.sort(allrows), np.arange(store.num_rows))  # disjoint and complete
    # drop_last: every rank yields the same number of full batches
    counts = [len(list(store.batches(rank=r, world_size=3, drop_last=True, **kw))) for r in range(3)]
    assert len(set(counts)) == 1 and counts[0] == (store.num_rows // 3) // 32
    # unshuffled ranks are contiguous slices
    ordered = [seen(store.batches(shuffle=False, rank=r, world_size=3, batch_size=32)) for r in range(3)]
    assert np.array_equal(np.concatenate(ordered), np.arange(store.num_rows))


def test_start_batch_equals_skipping(tmp_path):
    store = ids_store(tmp_path / "s")
    kw = dict(batch_size=48, buffer_rows=400, seed=5, epoch=1)
    full = list(store.batches(**kw))
    for k in (0, 1, 7, len(full) - 1, len(full) + 3):
        rest = list(store.batches(start_batch=k, **kw))
        assert len(rest) == max(0, len(full) - k)
        assert all(torch.equal(a, b) for a, b in zip(rest, full[k:]))
    rest = list(store.batches(start_batch=4, shuffle=False, batch_size=48))
    assert torch.equal(torch.cat(rest), torch.cat(list(store.iter_rows(batch_size=48)))[4 * 48:])


def test_stream_memory_is_bounded(tmp_path):
    store = ids_store(tmp_path / "s", n=6000, shard_rows=2000)  # store 12x the buffer, shards 4x it
    out = list(store.batches(batch_size=100, buffer_rows=500, seed=0))
    assert sum(len(b) for b in out) == 6000
    stats = store._stream_stats
    assert stats["buffer_rows"] == 500 and stats["peak_rows"] <= 500 and stats["chunk_rows"] <= 500
    assert stats["peak_rows"] >= 400  # the buffer is kept full for mixing


def test_stream_settings_errors(tmp_path):
    store = ids_store(tmp_path / "s", n=100)
    with pytest.raises(MonoscopeError, match="buffer_rows"):
        store.batches(batch_size=64, buffer_rows=32)
    with pytest.raises(MonoscopeError, match="rank"):
        store.batches(rank=2, world_size=2)


# --------------------------------------------------------------------------------------- crash + resume

KILL_SCRIPT = SYNTH + '''
import sys, time
from monoscope.store import StoreWriter
folder, n_contexts = sys.argv[1], int(sys.argv[2])
w = StoreWriter.open(folder, model="synthetic", model_fingerprint="fp0", hooks=HOOKS, dtype="float16",
                     shard_rows=24, meta={"corpus": "synthetic"})
print("start", w.contexts_done, flush=True)
for c in range(w.contexts_done, n_contexts):
    w.append(*context(c))
    time.sleep(0.003)
w.finish()
print("finished", flush=True)
'''


def test_resume_after_sigkill(tmp_path):
    n_contexts = 500
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    folder = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    acts, cols = reference(n_contexts)
    want = {h: a.half().float() for h, a in acts.items()}
    rnd = random.Random(0)
    kills = 0
    for attempt in range(8):
        with subprocess.Popen([sys.executable, str(script), str(folder), str(n_contexts)],
                              stdout=subprocess.PIPE, env=env, text=True) as proc:
            assert proc.stdout.readline().startswith("start")
            if attempt < 5:  # kill at a random moment: appending, writing a shard or manifest, finishing
                time.sleep(rnd.uniform(0.02, 0.6))
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            # whatever was committed is an exact prefix of the reference
            part = ActivationStore(folder, allow_unfinished=True)
            n = part.num_rows
            assert np.array_equal(part.context_ids(), cols[3][:n])
            assert part.contexts_done == (cols[3][n] if n < len(cols[3]) else n_contexts)
            if n:
                assert torch.equal(part.rows(np.arange(n), ID_HOOK), want[ID_HOOK][:n])
        else:
            assert proc.returncode == 0, proc.returncode
            break
    assert kills >= 3
    store = ActivationStore(folder)
    store.verify()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert store.contexts_done == n_contexts and store.num_rows == len(cols[0])
    for h in HOOKS:
        assert torch.equal(torch.cat(list(store.iter_rows(h, 1000))), want[h])
    for got, ref in zip((store.token_ids(), store.doc_ids(), store.positions(), store.context_ids()), cols):
        assert np.array_equal(got, ref)


def test_orphan_shard_is_replaced_on_resume(tmp_path):
    folder = tmp_path / "s"
    w = StoreWriter.open(folder, model="synthetic", model_fingerprint="fp0", hooks=HOOKS, shard_rows=20)
    for c in range(10):
        w.append(*context(c))
    w.close()  # "crash": buffered rows are lost
    committed = {s["file"] for s in json.loads((folder / "manifest.json").read_text())["shards"]}
    orphan = folder / f"shard_{len(committed):05d}.safetensors"
    orphan.write_bytes(b"half a shard")
    (folder / ".shard_00009.safetensors.abc.tmp").write_bytes(b"x")
    w = StoreWriter.open(folder, model="synthetic", model_fingerprint="fp0", hooks=HOOKS, shard_rows=20)
    assert not orphan.exists() and not list(folder.glob(".*.tmp"))
    assert 0 < w.contexts_done < 10 and w.rows_done > 0
    for c in range(w.contexts_done, 40):
        w.append(*context(c))
    w.finish()
    store = ActivationStore(folder)
    store.verify()
    assert np.array_equal(store.context_ids(), reference(40)[1][3])


# --------------------------------------------------------------------------------------- corruption

def test_verify_detects_flipped_byte(tmp_path):
    store = write_store(tmp_path / "s")
    f = tmp_path / "s" / store.shards[2]["file"]
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(MonoscopeError, match=store.shards[2]["file"]):
        ActivationStore(tmp_path / "s").verify()


def test_truncated_and_missing_shards(tmp_path):
    store = write_store(tmp_path / "s")
    f1 = tmp_path / "s" / store.shards[1]["file"]
    f1.write_bytes(f1.read_bytes()[:-100])
    with pytest.raises(MonoscopeError, match=f"{f1.name}.*truncated"):
        ActivationStore(tmp_path / "s")
    with pytest.raises(MonoscopeError, match=f1.name):
        store.verify()  # a reader opened before the damage
    f1.unlink()
    with pytest.raises(MonoscopeError, match=f"{f1.name}.*missing"):
        ActivationStore(tmp_path / "s")
    with pytest.raises(MonoscopeError, match=f"{f1.name}.*missing"):
        store.verify()


def test_check_finite_names_shard_and_row(tmp_path):
    w = StoreWriter.open(tmp_path / "s", model="m", model_fingerprint="f", hooks={"h": 4}, dtype="bfloat16",
                         shard_rows=10)
    for c in range(5):
        x = torch.ones(10, 4)
        if c == 3:
            x[6, 2] = float("inf")
        w.append({"h": x}, np.zeros(10), np.zeros(10), np.arange(10), np.full(10, c))
    w.finish()
    store = ActivationStore(tmp_path / "s")
    with pytest.raises(MonoscopeError, match=r"shard_00003.safetensors at row 6 \(global row 36\)"):
        store.check_finite("h")


# --------------------------------------------------------------------------------------- errors

def test_reopen_mismatch_and_finished(tmp_path):
    folder = tmp_path / "s"
    write_store(folder, n_contexts=5)
    base = dict(model="synthetic", model_fingerprint="fp0", hooks=HOOKS, dtype="float32")
    for change, word in [({"model": "other"}, "model"), ({"model_fingerprint": "fp1"}, "model_fingerprint"),
                         ({"hooks": {"layers.1.resid_post": 6}}, "hooks"), ({"dtype": "float16"}, "dtype")]:
        with pytest.raises(MonoscopeError, match=f"{word}: store has"):
            StoreWriter.open(folder, **{**base, **change})
    w = StoreWriter.open(folder, **base)
    assert w.finished and w.contexts_done == 5
    with pytest.raises(MonoscopeError, match="finished"):
        w.append(*context(5))
    w.close()


def test_unfinished_and_non_store_folders(tmp_path):
    w = StoreWriter.open(tmp_path / "s", model="m", model_fingerprint="f", hooks={"h": 2}, shard_rows=4)
    w.append({"h": torch.ones(5, 2)}, np.zeros(5), np.zeros(5), np.arange(5), np.zeros(5))
    with pytest.raises(MonoscopeError, match="another process"):
        StoreWriter.open(tmp_path / "s", model="m", model_fingerprint="f", hooks={"h": 2})
    w.close()
    with pytest.raises(MonoscopeError, match="unfinished"):
        ActivationStore(tmp_path / "s")
    assert ActivationStore(tmp_path / "s", allow_unfinished=True).num_rows == 5
    with pytest.raises(MonoscopeError, match="no activation store"):
        ActivationStore(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(MonoscopeError, match="not empty"):
        StoreWriter.open(tmp_path / "other", model="m", model_fingerprint="f", hooks={"h": 2})
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_append_validation(tmp_path):
    w = StoreWriter.open(tmp_path / "s", model="synthetic", model_fingerprint="fp0", hooks=HOOKS)
    acts, tok, doc, pos, ctx = context(0)
    with pytest.raises(MonoscopeError, match="missing"):
        w.append({ID_HOOK: acts[ID_HOOK]}, tok, doc, pos, ctx)
    with pytest.raises(MonoscopeError, match=r"expected \[rows, 3\]"):
        w.append({**acts, "layers.0.mlp_out": torch.ones(len(tok), 4)}, tok, doc, pos, ctx)
    with pytest.raises(MonoscopeError, match="token_ids"):
        w.append(acts, tok[:-1], doc, pos, ctx)
    w.append(*context(3))
    with pytest.raises(MonoscopeError, match="ascend"):
        w.append(*context(2))
    with pytest.raises(MonoscopeError, match="dtype"):
        StoreWriter.open(tmp_path / "t", model="m", model_fingerprint="f", hooks={"h": 2}, dtype="int8")
    with pytest.raises(MonoscopeError, match="reserved"):
        StoreWriter.open(tmp_path / "t", model="m", model_fingerprint="f", hooks={"token_ids": 2})
    w.close()


def test_trailing_empty_contexts_count(tmp_path):
    w = StoreWriter.open(tmp_path / "s", model="synthetic", model_fingerprint="fp0", hooks=HOOKS, shard_rows=8)
    w.append(*context(0))
    empty = {h: torch.zeros(0, d) for h, d in HOOKS.items()}
    w.append(empty, [], [], [], [], contexts_end=3)  # contexts 1 and 2 produced no rows
    assert w.rows_buffered + w.rows_done == len(context(0)[1])
    w.finish()
    assert ActivationStore(tmp_path / "s").contexts_done == 3


def test_disk_full_maps_to_monoscope_error(tmp_path, monkeypatch):
    folder = tmp_path / "s"
    w = StoreWriter.open(folder, model="synthetic", model_fingerprint="fp0", hooks=HOOKS, shard_rows=20)
    for c in range(6):
        w.append(*context(c))
    before = (folder / "manifest.json").read_text()
    files_before = sorted(p.name for p in folder.iterdir())

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(MonoscopeError, match="disk is probably full or the folder is not writable"):
        for c in range(6, 20):
            w.append(*context(c))
    assert (folder / "manifest.json").read_text() == before
    assert sorted(p.name for p in folder.iterdir()) == files_before  # temp file removed, nothing new
    monkeypatch.undo()
    # the failed shard is still buffered: carrying on loses nothing
    for c in range(w._next_context, 30):
        w.append(*context(c))
    w.finish()
    store = ActivationStore(folder)
    store.verify()
    acts, cols = reference(30)
    assert np.array_equal(store.context_ids(), cols[3])
    assert torch.equal(torch.cat(list(store.iter_rows(ID_HOOK, 500))), acts[ID_HOOK])


# ------------------------------------------------------------------------------------------ hand-edited manifests
def _edit(m, key, value):
    m = json.loads(json.dumps(m))
    target = m["shards"][0] if key.startswith("shards.0.") else m
    key = key.removeprefix("shards.0.")
    if value is KeyError:
        target.pop(key)
    else:
        target[key] = value
    return m


@pytest.mark.parametrize("key, value, says", [
    ("shards", KeyError, "field 'shards' is missing"),
    ("shards", {"a": 1}, "field 'shards' is"),
    ("num_rows", "many", "field 'num_rows' is"),
    ("num_rows", 1, "'num_rows' is 1 but the shards hold"),
    ("finished", "yes", "field 'finished' is"),
    ("dtype", "int8", "field 'dtype' is"),
    ("hooks", {}, "field 'hooks' is"),
    ("model", 3, "field 'model' is"),
    ("format", "something-else", "is not an activation store manifest"),
    ("version", 99, "upgrade monoscope"),
    ("version", "one", "field 'version' is"),
    ("shards.0.file", "../../etc/passwd", "expected a shard file name"),
    ("shards.0.rows", 0, "expected a positive integer"),
    ("shards.0.sha256", None, "expected a hex string"),
])
def test_hand_edited_manifest_is_one_clear_error(tmp_path, key, value, says):
    folder = write_store(tmp_path / "s", n_contexts=8).folder
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps(_edit(json.loads(manifest.read_text()), key, value)))
    with pytest.raises(MonoscopeError, match=re.escape(says)) as err:
        ActivationStore(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", "\xff\xfe"])
def test_unreadable_manifest_is_one_clear_error(tmp_path, text):
    folder = write_store(tmp_path / "s", n_contexts=8).folder
    (folder / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(MonoscopeError, match="manifest|JSON") as err:
        ActivationStore(folder)
    assert "\n" not in str(err.value)
