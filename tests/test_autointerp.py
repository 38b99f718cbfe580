"""Automated interpretability: backends (fake OpenAI server on 127.0.0.1, cache, tiny HF model), parsers
and scores with a scripted oracle."""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from monoscope.errors import MonoscopeError
from monoscope.interpret.autointerp import (
    Example, ExplainConfig, Explanation, FeatureExamples, explain, explain_and_score, explain_features, fuzz_examples,
    not_ok, parse_explanation, parse_selection, parse_simulation, pearson, read_results, render, score_detection,
    score_fuzzing, score_intruder, score_simulation)
from monoscope.interpret.backends import (
    BackendError, CachedBackend, CallableBackend, HFBackend, OpenAIBackend, make_backend)

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- synthetic "cat" feature
WORDS = "the dog sat on a mat and ran to the old barn near my house when it rained".split()


def _sentence(i: int, with_cat: bool) -> Example:
    words = [WORDS[(i * 3 + k) % len(WORDS)] for k in range(8)]
    if with_cat:
        words[2 + i % 5] = "cat"
    tokens = [words[0]] + [" " + w for w in words[1:]]
    acts = [4.0 if t.strip() == "cat" else 0.0 for t in tokens]
    return Example(tokens, acts)


def cat_feature(feature: int = 0, n: int = 12) -> FeatureExamples:
    return FeatureExamples(feature, top=[_sentence(i, True) for i in range(n)],
                           intervals=[_sentence(i + 50, True) for i in range(4)],
                           negatives=[_sentence(i + 100, False) for i in range(n)])


def oracle(prompt: str) -> str:
    """A perfect judge for the cat feature, reading monoscope's own prompt formats."""
    if prompt.startswith("We are studying"):
        return "Sure!\nExplanation: the word \"cat\"."
    if "Reply with the numbers of the matching excerpts" in prompt:
        picked = []
        for k, text in re.findall(r"^Excerpt (\d+): (.*)$", prompt, re.MULTILINE):
            marks = re.findall(r"<<(.*?)>>", text)
            ok = all(m == "cat" for m in marks) if marks else "cat" in text.split()
            if ok:
                picked.append(int(k))
        return json.dumps(picked)
    if "Odd one out:" in prompt:
        return json.dumps([int(k) for k, text in re.findall(r"^Excerpt (\d+): (.*)$", prompt, re.MULTILINE)
                           if "cat" not in text.split()])
    if "The tokens, one per line:" in prompt:
        block = prompt.split("The tokens, one per line:\n")[1].split("\n\nReply with")[0]
        return "\n".join(f"{t}\t{10 if t == 'cat' else 0}" for t in block.splitlines())
    return "?"


# ---------------------------------------------------------------- fake OpenAI-compatible server
class FakeServer:
    """ThreadingHTTPServer on 127.0.0.1 answering /v1/chat/completions and /v1/completions from a script.

    ``script(n, body) -> (status, body_bytes_or_text, delay_s[, headers])``; n counts requests from 0. Serves at most
    ``max_requests`` and shuts itself down after ``lifetime`` seconds whatever happens.
    """

    def __init__(self, script, max_requests: int = 200, lifetime: float = 40.0):
        self.script, self.max_requests = script, max_requests
        self.count = 0
        self.in_flight = self.max_in_flight = 0
        self.requests: list[tuple[str, dict, dict]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    n = server.count
                    server.count += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.requests.append((self.path, dict(self.headers), body))
                try:
                    if n >= server.max_requests:
                        status, payload, delay = 400, "too many requests for this test", 0
                    else:
                        status, payload, delay, *headers = server.script(n, body)
                    time.sleep(delay)
                    data = payload if isinstance(payload, bytes) else str(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers[0] if headers else {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(lifetime, self.httpd.shutdown)
        self.timer.daemon = True

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def chat(text: str) -> str:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})


def client(url: str, **kw) -> OpenAIBackend:
    kw = dict(dict(timeout=2.0, max_retries=3, backoff=0.01, max_backoff=0.05, concurrency=4), **kw)
    return OpenAIBackend("fake-model", url, api_key="sk-test", **kw)


def test_openai_retries_500_then_succeeds():
    script = lambda n, body: (500, "boom", 0) if n < 2 else (200, chat("hello"), 0)
    with FakeServer(script) as srv:
        assert client(srv.url).complete("hi", max_tokens=5, temperature=0.0) == "hello"
        assert srv.count == 3
        path, headers, body = srv.requests[-1]
        assert path == "/v1/chat/completions"
        assert headers.get("Authorization") == "Bearer sk-test"
        assert body["messages"][0]["content"] == "hi" and body["max_tokens"] == 5 and body["model"] == "fake-model"


def test_openai_429_honours_retry_after_and_timeout_is_retried():
    def script(n, body):
        if n == 0:
            return 200, chat("late"), 1.0  # slower than the client's timeout
        if n == 1:
            return 429, "slow down", 0, {"Retry-After": "0.5"}
        return 200, chat("ok"), 0
    with FakeServer(script) as srv:
        t0 = time.time()
        assert client(srv.url, timeout=0.3, max_backoff=1.0).complete("x") == "ok"
        assert srv.count == 3 and 0.8 < time.time() - t0 < 5  # 0.3 s timeout + 0.5 s Retry-After


def test_openai_gives_up_and_records_failures():
    with FakeServer(lambda n, body: (503, "down", 0)) as srv:
        with pytest.raises(BackendError, match="gave up after 3 attempts.*503"):
            client(srv.url, max_retries=2).complete("x")
        assert srv.count == 3
    with FakeServer(lambda n, body: (401, "bad key", 0)) as srv:  # 4xx: no retry
        with pytest.raises(BackendError, match="HTTP 401"):
            client(srv.url).complete("x")
        assert srv.count == 1


@pytest.mark.parametrize("payload", [b"<html>not json</html>", b'{"error": "oops"}', b'{"choices": []}',
                                     b'{"choices": [{"message": {"content": null}}]}'])
def test_openai_garbage_is_retried_then_a_recorded_failure(payload):
    with FakeServer(lambda n, body: (200, payload, 0)) as srv:
        results = client(srv.url).complete_batch(["a", "b"])
        assert all(isinstance(r, BackendError) for r in results)
        assert srv.count == 2 * 4  # malformed answers are retried: one try + max_retries=3 each


def test_openai_batch_is_concurrent_and_keeps_order():
    def script(n, body):
        return 200, chat("echo " + body["messages"][0]["content"]), 0.3
    with FakeServer(script) as srv:
        t0 = time.time()
        out = client(srv.url, concurrency=8).complete_batch([f"p{i}" for i in range(8)])
        elapsed = time.time() - t0
        assert out == [f"echo p{i}" for i in range(8)]
        assert srv.max_in_flight >= 4 and elapsed < 1.8


def test_openai_completions_endpoint_and_environment(monkeypatch):
    script = lambda n, body: (200, json.dumps({"choices": [{"text": "done " + body["prompt"]}]}), 0)
    with FakeServer(script) as srv:
        monkeypatch.setenv("MONOSCOPE_OPENAI_BASE_URL", srv.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
        backend = make_backend("openai-completions:tiny")
        assert backend.complete("p") == "done p"
        path, headers, _ = srv.requests[0]
        assert path == "/v1/completions" and headers.get("Authorization") == "Bearer sk-env"


def test_explain_features_over_http_with_partial_failures(tmp_path):
    def script(n, body):
        if n % 7 == 3:
            return 500, "flaky", 0
        return 200, chat(oracle(body["messages"][0]["content"])), 0
    with FakeServer(script) as srv:
        backend = make_backend(f"openai:fake@{srv.url}", cache_dir=tmp_path / "cache", max_retries=2,
                               backoff=0.01, concurrency=4)
        feats = {f: cat_feature(f) for f in range(3)}
        records = explain_features(feats, None, backend, tmp_path / "out.jsonl", progress=False)
        assert [r["status"] for r in records] == ["ok"] * 3
        assert all(r["detection"]["accuracy"] == 1.0 for r in records)
        calls = srv.count
        # a fresh run into a new results file is answered from the disk cache alone
        explain_features(feats, None, backend, tmp_path / "again.jsonl", progress=False)
        assert srv.count == calls


# ---------------------------------------------------------------- cache and specs
def test_cache_prevents_second_call(tmp_path):
    calls = []

    def fn(prompt):
        calls.append(prompt)
        if prompt == "bad":
            raise BackendError("nope")
        return prompt.upper()

    inner = CallableBackend(fn, identity="upper")
    cached = CachedBackend(inner, tmp_path)
    assert cached.complete_batch(["a", "b", "bad"])[:2] == ["A", "B"]
    assert len(calls) == 3
    again = CachedBackend(inner, tmp_path)  # a rerun: fresh object, same folder
    out = again.complete_batch(["a", "b", "bad"])
    assert out[:2] == ["A", "B"] and isinstance(out[2], BackendError)
    assert calls.count("a") == 1 and calls.count("bad") == 2  # failures are not cached
    assert again.hits == 2
    again.complete("a", max_tokens=7)  # other parameters: other key
    assert calls.count("a") == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_make_backend_specs(tmp_path):
    b = make_backend("openai:my@model@http://127.0.0.1:9/v1/")
    assert isinstance(b, OpenAIBackend) and b.model == "my@model" and b.base_url == "http://127.0.0.1:9/v1"
    assert isinstance(make_backend("openai:m@http://127.0.0.1:9/v1", cache_dir=tmp_path), CachedBackend)
    for bad in ("gemma-3-270m", "hf:", "llama:x", "openai:m@ftp://x"):
        with pytest.raises(MonoscopeError):
            make_backend(bad)
    with pytest.raises(MonoscopeError, match="cannot load model"):
        make_backend(f"hf:{tmp_path / 'nothing'}")


# ---------------------------------------------------------------- parsers
def test_parse_explanation():
    assert parse_explanation("Explanation: the word cat\nmore") == ("the word cat", None)
    assert parse_explanation("**Explanation:** mentions of cats.") == ("mentions of cats.", None)
    assert parse_explanation("  \n plural nouns after 'the'\n")[0] == "plural nouns after 'the"
    assert parse_explanation("Thinking... explanation - dates in June")[0] == "dates in June"
    for bad in ("", "   \n", "Explanation:", "#$%^ 12 34 ..", "<<>>(3) 9 9 9 9"):
        text, why = parse_explanation(bad)
        assert text is None and why
    assert len(parse_explanation("cat " * 200)[0]) <= 200
    prompt = "Find what the marked tokens have in common.\nExcerpt 1: the old <<cat>>(10) sat\nExplanation:"
    text, why = parse_explanation("\n\nFind what the marked tokens have in common.\nExplanation:", prompt=prompt)
    assert text is None and "repeats the prompt" in why
    assert parse_explanation(" cats and kittens\n\nExcerpt 11: foo", prompt=prompt)[0] == "cats and kittens"
    assert parse_explanation("Explanation:\n\nthe word cat", prompt=prompt)[0] == "the word cat"


def test_parse_selection():
    assert parse_selection("[1, 3]", 4) == [True, False, True, False]
    assert parse_selection("I think: [] none", 3) == [False, False, False]
    assert parse_selection("[0, 1, 1]", 3) == [False, True, True]
    assert parse_selection("['yes', 'no']", 2) == [True, False]
    assert parse_selection("1: yes\n2: no\n3. YES", 3) == [True, False, True]
    assert parse_selection("Excerpts 2 and 4 match.", 4) == [False, True, False, True]
    assert parse_selection("Yes, it does.", 1) == [True]
    assert parse_selection("no", 1) == [False]
    assert parse_selection("None of them.", 2) == [False, False]
    assert parse_selection("[9]", 3) is None
    assert parse_selection("blah", 3) is None
    assert parse_selection("", 3) is None


def test_parse_simulation():
    toks = ["The", " cat", " sat", "\n", " cat"]
    assert parse_simulation("The\t0\ncat\t9\nsat\t1\n↵\t0\ncat\t7", toks) == ([0, 9, 1, 0, 7], 5)
    assert parse_simulation("[0, 10, 0, 0, 4]", toks) == ([0, 10, 0, 0, 4], 5)
    assert parse_simulation('[["cat", 8], ["cat", 3]]', toks) == ([0, 8, 0, 0, 3], 2)
    assert parse_simulation("cat: 8\nsat = 2", toks) == ([0, 8, 2, 0, 0], 2)  # missing -> 0
    assert parse_simulation("2\tcat\t6\n5\tcat\t4", toks) == ([0, 6, 0, 0, 4], 2)
    assert parse_simulation("cat\t99\nxyz\t5", toks) == ([0, 10, 0, 0, 0], 1)  # clipped; unknown skipped
    assert parse_simulation("no idea", toks) == ([0] * 5, 0)


def test_pearson_and_render():
    assert pearson([0, 1, 2], [0, 2, 4]) == pytest.approx(1.0)
    assert pearson([1, 1, 1], [0, 1, 2]) is None
    e = Example(["The", " cat", "\n"], [0, 4, 0])
    assert render(e, [1], [0, 10, 0]) == "The <<cat>>(10)↵"
    with pytest.raises(MonoscopeError):
        Example(["a"], [1.0, 2.0])


# ---------------------------------------------------------------- scores with an oracle
def test_oracle_scores_perfectly():
    fx = cat_feature()
    backend = CallableBackend(oracle)
    expl = explain(fx, backend)
    assert expl.ok and expl.text == 'the word "cat".' and "<<cat>>(10)" in expl.prompt
    det = score_detection(expl, fx.top, fx.negatives, backend, seed=1)
    assert det["accuracy"] == 1.0 and det["f1"] == 1.0 and det["n"] == 24 and det["failures"] == 0
    fuzz = score_fuzzing(expl, fx.top, backend, seed=2)
    assert fuzz["accuracy"] == 1.0 and fuzz["n"] == 12
    sim = score_simulation(expl, fx.top[:4] + fx.negatives[:4], backend)
    assert sim["pearson"] == pytest.approx(1.0) and sim["n"] == 64 and sim["unparsed"] == 0


def test_fuzz_examples_balanced_and_wrong_marks_avoid_firing_tokens():
    items = fuzz_examples(cat_feature().top, seed=3)
    assert sum(ok for _, ok in items) == 6 and len(items) == 12
    for text, ok in items:
        marks = re.findall(r"<<(.*?)>>", text)
        assert len(marks) == 1 and (marks == ["cat"]) == ok


def test_bad_answers_are_failures_not_crashes():
    fx = cat_feature()
    garbage = CallableBackend(lambda p: "%%%% ???")
    expl = explain(fx, garbage)
    assert not expl.ok and "garbage" in expl.failure and expl.raw == "%%%% ???"
    det = score_detection("cats", fx.top[:5], fx.negatives[:5], garbage)
    assert det["n"] == 0 and det["failures"] == 10 and det["accuracy"] is None
    assert "unparseable" in det["failure_reason"]
    sim = score_simulation("cats", fx.top[:3], garbage)
    assert sim["pearson"] == 0.0 and sim["unparsed"] == 3 and sim["note"] == "constant predictions"

    def broken(p):
        raise RuntimeError("backend bug")
    det = score_detection("cats", fx.top[:5], fx.negatives[:5], CallableBackend(broken))
    assert det["failures"] == 10 and "backend bug" in det["failure_reason"]
    assert not explain(fx, CallableBackend(broken)).ok


def test_explain_features_resumes_and_records_failures(tmp_path):
    calls = []

    def counting(prompt):
        calls.append(prompt)
        return oracle(prompt)

    backend = CallableBackend(counting)
    feats = {f: cat_feature(f) for f in range(4)}
    feats[2] = FeatureExamples(2, top=[])  # dead feature
    feats[3].negatives = []  # detection cannot run
    out = tmp_path / "res" / "explanations.jsonl"
    recs = explain_features(feats, [0, 1], backend, out, ExplainConfig(seed=1), progress=False)
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert recs[0]["simulation"]["pearson"] == pytest.approx(1.0) and recs[0]["fuzzing"]["accuracy"] == 1.0
    n_calls = len(calls)
    with open(out, "a") as fh:  # an interrupted write leaves a torn line
        fh.write('{"feature": 3, "stat')
    before = out.read_text()
    with pytest.raises(MonoscopeError, match=r"\[99\] out of range"):
        explain_features(feats, [0, 1, 2, 3, 99], backend, out, ExplainConfig(seed=1), progress=False)
    assert out.read_text() == before and len(calls) == n_calls  # checked before any request or write
    recs = explain_features(feats, [0, 1, 2, 3], backend, out, ExplainConfig(seed=1), progress=False)
    assert [r["feature"] for r in recs] == [0, 1, 2, 3]
    assert recs[2]["status"] == "failed" and "dead" in recs[2]["failure"]
    assert recs[3]["status"] == "partial" and "non-activating" in recs[3]["detection"]["failure"]
    assert [r["feature"] for r in not_ok(recs)] == [2, 3]
    assert not any("feature 0" in c for c in calls[n_calls:])
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(ln) for ln in lines)
    assert set(read_results(out)) == {0, 1, 2, 3}
    n_calls = len(calls)
    explain_features(feats, [0, 1, 2, 3], backend, out, ExplainConfig(seed=1), progress=False)
    assert len(calls) == n_calls  # everything was done
    feats[2] = cat_feature(2)
    recs = explain_features(feats, [2], backend, out, ExplainConfig(seed=1, retry_failed=True), progress=False)
    assert recs[0]["status"] == "ok" and read_results(out)[2]["status"] == "ok"


def test_config_validation():
    with pytest.raises(MonoscopeError, match="unknown score"):
        ExplainConfig(scores=("detection", "vibes"))
    with pytest.raises(MonoscopeError):
        ExplainConfig(n_score=0)


# ---------------------------------------------------------------- a real (tiny, random) local model
def test_hf_backend_on_tiny_random_model(tmp_path):
    from monoscope.models import tiny_model

    lm = tiny_model("llama")
    backend = HFBackend(lm)
    assert backend.identity.startswith("hf:tiny-llama:")
    a = backend.complete("hello", max_tokens=5)
    assert isinstance(a, str) and a == backend.complete("hello", max_tokens=5)  # greedy is deterministic
    assert isinstance(backend.complete("x" * 1000, max_tokens=4, temperature=0.8), str)  # cut to fit
    lm.tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert isinstance(backend.complete("hello", max_tokens=3), str)
    lm.tokenizer.chat_template = None

    fx = {f: cat_feature(f, n=4) for f in range(2)}
    recs = explain_features(fx, [0, 1], backend, tmp_path / "out.jsonl",
                            ExplainConfig(n_score=2, max_tokens=24), progress=False)
    for r in recs:
        assert r["status"] in ("ok", "partial", "failed")
        if r["status"] == "failed":
            assert r["failure"]
    det = score_detection("the word cat", fx[0].top[:2], fx[0].negatives[:2], backend, max_tokens=16)
    assert det["n"] + det["failures"] == 4
    sim = score_simulation(Explanation("the word cat", "", ""), fx[0].top[:1], backend, max_tokens=40)
    assert sim["n_examples"] == 1 and -1.0 <= sim["pearson"] <= 1.0


# ---------------------------------------------------------------- a real feature-statistics artifact + the CLI
def _stats_folder(root):
    import torch

    from monoscope.interpret.stats import StatsConfig, compute_feature_stats
    from monoscope.sae import SAEConfig, build_sae
    from synthetic import random_store

    hook = "layers.1.resid_post"
    random_store(root / "store", hook, d=16, ctx_len=12)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig("topk", d_in=16, d_sae=24, k=4, hook_name=hook, model_name="tiny-llama"))
    cfg = StatsConfig(top_k=6, n_intervals=3, per_interval=2, batch_size=128, context_window=(4, 2))
    return compute_feature_stats(root / "store", root / "stats", cfg, sae=sae, show_progress=False)


def test_stats_adapter_and_cli(tmp_path, monkeypatch, capsys):
    import argparse

    from monoscope.interpret.autointerp import setup_explain
    from monoscope.interpret.feature_stats import FeatureStats

    stats = _stats_folder(tmp_path)
    reader = FeatureStats(stats)
    live = reader.top_features(3)
    assert len(live) == 3
    fx = reader.examples(live[0], n_negatives=5)
    assert fx.feature == live[0] and len(fx.top) == 6 and fx.intervals and len(fx.negatives) == 5
    assert all(len(e.tokens) == len(e.acts) and e.max_act > 0 for e in fx.top)
    assert all(e.max_act == 0 for e in fx.negatives)
    own = {json.dumps(e.tokens) for e in fx.top}
    assert not any(json.dumps(e.tokens) in own for e in fx.negatives)
    with pytest.raises(MonoscopeError, match="out of range"):
        reader.examples(10_000)
    with pytest.raises(MonoscopeError, match="no feature statistics"):
        FeatureStats(tmp_path)

    def script(n, body):
        prompt = body["messages"][0]["content"]
        return 200, chat("Explanation: tokens near the start" if prompt.startswith("We are") else "[1, 2]"), 0
    monkeypatch.setenv("MONOSCOPE_CACHE", str(tmp_path / "cache"))
    with FakeServer(script) as srv:
        p = argparse.ArgumentParser()
        run = setup_explain(p)
        ns = p.parse_args(["--stats", str(stats), "--backend", f"openai:fake@{srv.url}", "--top-n", "2",
                           "--scores", "detection", "fuzzing", "--n-score", "4", "--baseline", "false"])
        run(ns)
        lines = (stats / "explanations.jsonl").read_text().splitlines()
        assert [json.loads(ln)["feature"] for ln in lines] == live[:2]
        assert all(json.loads(ln)["explanation"] == "tokens near the start" for ln in lines)
        calls = srv.count
        run(p.parse_args(["--stats", str(stats), "--backend", f"openai:fake@{srv.url}", "--features",
                          str(live[0]), "--scores", "detection", "fuzzing", "--n-score", "4"]))
        assert srv.count == calls  # already done: skipped
    out = capsys.readouterr().out
    assert "tokens near the start" in out and "detection=" in out and "features ok" in out
    assert (tmp_path / "cache" / "llm-cache").is_dir()


def test_prompt_echo_with_other_whitespace_is_rejected():
    prompt = "The following are text excerpts where it is active.\nThe tokens where it fires are marked <<like this>>"
    text, why = parse_explanation("The following are text excerpts where it is active. The tokens where", prompt=prompt)
    assert text is None and "repeats the prompt" in why


# ---------------------------------------------------------------- the model-free baseline explainer
def test_distinctive_tokens_against_the_corpus():
    from monoscope.interpret.token_explainer import contains_any, describe, distinctive_tokens

    firing = [" cat"] * 6 + [" the"] * 3 + [" dog"]
    corpus = [" the"] * 40 + [" dog"] * 5 + [" mat"] * 5
    assert distinctive_tokens(firing, corpus) == ["cat"]  # "the" fires often but is everywhere
    assert distinctive_tokens([" a", " b", " a", " b", " c", " d"], [" z"] * 9) == ["a", "b"]  # half covered
    assert distinctive_tokens([], corpus) == []
    assert distinctive_tokens(["<eos>"] * 5 + [" x"] * 3, [" y"] * 9) == ["x"]
    assert describe(["cat"]) == 'the token "cat"' and describe(["a", "b", "c"]) == 'the tokens "a", "b" or "c"'
    assert contains_any(["cat"], ["The", " Cat", "!"]) and not contains_any(["cat"], ["the", " cats"])


def test_token_baseline_replaces_an_echoing_llm_and_wins_ties():
    echo = CallableBackend(lambda p: "The following are text excerpts where it is active" if p.startswith("We are")
                           else oracle(p))
    rec = explain_and_score(cat_feature(), echo, ExplainConfig(scores=("detection", "fuzzing")))
    assert rec["explained_by"] == "tokens" and rec["explanation"] == 'the token "cat"' and rec["status"] == "ok"
    assert rec["candidates"]["llm"]["status"] == "failed" and "repeats the prompt" in rec["candidates"]["llm"]["failure"]
    assert rec["detection"]["accuracy"] == 1.0 and rec["candidates"]["tokens"]["rule"]["accuracy"] == 1.0
    tie = explain_and_score(cat_feature(), CallableBackend(oracle), ExplainConfig(scores=("detection",)))
    assert tie["explained_by"] == "tokens" and tie["candidates"]["llm"]["explanation"] == 'the word "cat".'
    assert tie["candidates"]["llm"]["detection"]["accuracy"] == tie["detection"]["accuracy"] == 1.0
    assert parse_explanation("Find what", prompt="")[0] is None  # a fragment of the instructions
    assert parse_explanation("the word cat", prompt="")[0] == "the word cat"
    plain = explain_and_score(cat_feature(), CallableBackend(oracle), ExplainConfig(scores=("detection",),
                                                                                    baseline=False))
    assert plain["explained_by"] == "llm" and "candidates" not in plain


def test_intruder_score_against_an_oracle_and_a_guesser():
    fx = cat_feature(n=12)
    good = score_intruder(fx.top[:8], fx.negatives[:2], CallableBackend(oracle), group_size=5)
    assert good == {"accuracy": 1.0, "chance": 0.2, "n": 2, "failures": 0}
    first = score_intruder(fx.top[:8], fx.negatives[:2], CallableBackend(lambda p: "[1]"), seed=1, group_size=5)
    assert first["n"] == 2 and first["accuracy"] in (0.0, 0.5, 1.0)
    vague = score_intruder(fx.top[:8], fx.negatives[:2], CallableBackend(lambda p: "[1, 2]"), group_size=5)
    assert vague["n"] == 0 and vague["failures"] == 2 and "not one excerpt" in vague["failure_reason"]
    assert "failure" in score_intruder(fx.top[:3], fx.negatives[:2], CallableBackend(oracle), group_size=5)
    rec = explain_and_score(fx, CallableBackend(oracle), ExplainConfig())  # every score, intruder included
    assert rec["status"] == "ok" and rec["intruder"]["accuracy"] == 1.0


def test_echo_rule_keeps_real_explanations():
    from monoscope.interpret.autointerp import _paraphrases_task

    for echo in ("The following are text excerpts where it is active", "Find what",
                 "Find what the marked tokens have in common"):
        assert _paraphrases_task(echo), echo
    for real in ("numbers from 1 to 10", "what usually comes next is a closing bracket",
                 "tokens where the text is in French", 'the word "def" in Python code'):
        assert not _paraphrases_task(real), real


def test_explanations_naming_only_the_task_material_are_rejected():
    """Seen from the 270M model in a research run: texts about the excerpts themselves say nothing of the
    feature; any content word or a quoted token keeps an explanation."""
    from monoscope.interpret.autointerp import _only_task_words, parse_explanation

    for vacuous in ("The following are the text excerpts from the text.",
                    "The following is a list of the tokens in the text.", "the marked tokens",
                    '<span class="text">The following is a list of the tokens in the text.',
                    '"The following is a list of the tokens in the text."'):
        assert _only_task_words(vacuous) or vacuous[0] in "<\"", vacuous  # markup and quotes: parse strips them
        text, reason = parse_explanation(f"Explanation: {vacuous}\n")
        assert text is None and "repeats the prompt" in reason
    for real in ("numbers from 1 to 10", "tokens after a comma", "French language text", "the token 'the'",
                 'the word "in"', "words at the start of a line", "the excerpts are about cooking",
                 "words in parentheses", "tokens followed by parentheses", "the most common words", "short words",
                 "the next line", "what comes next", "the token <<a>>"):
        assert not _only_task_words(real), real
        assert parse_explanation(f"Explanation: {real}\n")[0], real
    assert parse_explanation("Explanation: <b>tokens after a comma</b>\n")[0] == "tokens after a comma"
    assert parse_explanation("Explanation: <<the>> before a noun\n")[0] == "<<the>> before a noun"  # markers kept
    assert parse_explanation("Explanation: <<a>> or <<b>> before a noun\n")[0] == "<<a>> or <<b>> before a noun"


def test_choice_compares_only_scores_both_completed():
    from monoscope.interpret.autointerp import _choose

    llm = {"status": "partial", "detection": {"accuracy": 0.9, "n": 8}, "fuzzing": {"failure": "x", "n": 0}}
    tokens = {"status": "ok", "detection": {"accuracy": 0.6, "n": 8}, "fuzzing": {"accuracy": 1.0, "n": 8}}
    assert _choose({"llm": llm, "tokens": tokens}, ["detection", "fuzzing"]) == "llm"  # 0.9 > 0.6 on detection
    assert _choose({"llm": dict(llm, detection={"accuracy": 0.6, "n": 8}), "tokens": tokens},
                   ["detection", "fuzzing"]) == "tokens"  # a tie goes to the baseline
    assert _choose({"llm": {"status": "failed"}, "tokens": tokens}, ["detection"]) == "tokens"
    assert _choose({"llm": llm, "tokens": {"status": "failed"}}, ["detection"]) == "llm"
