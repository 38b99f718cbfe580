"""Explanation backends and ``monoscope explain`` under failing endpoints: they must never report success
when nothing worked, and never send corpus text to a host nobody named. Every server here is local
(127.0.0.1) with bounded request counts."""
from __future__ import annotations

import argparse
import json
import socket
from collections import Counter

import pytest

from monoscope import cli
from monoscope.errors import MonoscopeError
from monoscope.interpret import backends
from monoscope.interpret.autointerp import ExplainConfig, explain_features, not_ok, read_results, setup_explain
from monoscope.interpret.backends import OpenAIBackend, make_backend
from test_autointerp import FakeServer, _stats_folder, cat_feature, chat, oracle

pytestmark = pytest.mark.timeout(60)

FAST = dict(timeout=2.0, max_retries=2, backoff=0.01, max_backoff=0.02, concurrency=1)


def good(n, body):
    """Oracle answers in the OpenAI chat format."""
    return 200, chat(oracle(body["messages"][0]["content"])), 0


def closed_port() -> int:
    """A local port with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_explain(stats, url, *extra) -> int:
    """Run ``monoscope explain`` through its runner; returns the runner's exit status."""
    p = argparse.ArgumentParser()
    run = setup_explain(p)
    return run(p.parse_args(["--stats", str(stats), "--backend", f"openai:fake@{url}", "--scores", "detection",
                             "--n-score", "4", "--concurrency", "1", *extra]))


@pytest.fixture
def fast_retries(monkeypatch, tmp_path):
    """Small backoff for backends built from specs, and a private completion cache."""
    monkeypatch.setenv("MONOSCOPE_CACHE", str(tmp_path / "cache"))
    init = OpenAIBackend.__init__

    def quick(self, *a, **kw):
        init(self, *a, **dict(kw, timeout=2.0, max_retries=2, backoff=0.01, max_backoff=0.02))
    monkeypatch.setattr(OpenAIBackend, "__init__", quick)


# ---------------------------------------------------------------- endpoint specs
@pytest.mark.parametrize("spec", ["openai:m@127.0.0.1:9/v1", "openai:m@localhost:8000", "openai:m@ftp://x/v1",
                                  "openai:m"])
def test_endpoint_without_scheme_is_rejected_before_any_socket(spec, monkeypatch):
    monkeypatch.delenv("MONOSCOPE_OPENAI_BASE_URL", raising=False)
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("a socket was opened"))
    with pytest.raises(MonoscopeError, match=r"openai:m@http://HOST:PORT/v1") as err:
        make_backend(spec)
    assert "\n" not in str(err.value)


def test_environment_url_must_be_explicit_too(monkeypatch):
    monkeypatch.setenv("MONOSCOPE_OPENAI_BASE_URL", "127.0.0.1:9/v1")
    with pytest.raises(MonoscopeError, match="not an http"):
        make_backend("openai:m")
    monkeypatch.setenv("MONOSCOPE_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert make_backend("openai:m").base_url == "http://127.0.0.1:9/v1"


def test_cli_rejects_schemeless_endpoint_with_status_2(tmp_path, monkeypatch, capsys):
    stats = _stats_folder(tmp_path)
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("a socket was opened"))
    rc = cli.main(["explain", "--stats", str(stats), "--features", "0", "--backend", "openai:m@127.0.0.1:9/v1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "http://HOST:PORT/v1" in err and "sending corpus text" not in err
    assert not (stats / "explanations.jsonl").exists()


def test_host_line_is_printed_once_per_backend(capsys):
    with FakeServer(good, max_requests=20) as srv:
        b = OpenAIBackend("fake", srv.url, **FAST)
        b.complete_batch(["a", "b", "c"])
        b.complete("d")
    err = capsys.readouterr().err
    assert err.count("explain: sending corpus text to") == 1 and srv.url in err


# ---------------------------------------------------------------- retries of transient faults
@pytest.mark.parametrize("bad", [(500, "boom"), (200, "<html>not json</html>"), (200, json.dumps({"id": 1}))],
                         ids=["http-500", "non-json-200", "no-choices-200"])
def test_transient_fault_then_good_is_retried(bad):
    with FakeServer(lambda n, body: (*bad, 0) if n == 0 else (200, chat("fine"), 0), max_requests=5) as srv:
        assert OpenAIBackend("fake", srv.url, **FAST).complete("hi") == "fine"
        assert srv.count == 2


def test_connection_refused_is_retried_then_failed(tmp_path):
    calls = []
    b = OpenAIBackend("fake", f"http://127.0.0.1:{closed_port()}/v1", **FAST)
    real = b._post_once
    b._post_once = lambda url, body: calls.append(url) or real(url, body)
    recs = explain_features({0: cat_feature(0)}, [0], b, tmp_path / "r.jsonl", ExplainConfig(scores=("detection",)),
                            progress=False)
    assert len(calls) == FAST["max_retries"] + 1
    assert recs[0]["status"] == "failed" and "ConnectionRefusedError" in recs[0]["failure"]


# ---------------------------------------------------------------- record statuses
def test_malformed_scores_make_a_partial_record_not_ok(tmp_path):
    def script(n, body):
        prompt = body["messages"][0]["content"]
        return (200, chat(oracle(prompt)), 0) if prompt.startswith("We are") else (200, "not json", 0)
    with FakeServer(script, max_requests=60) as srv:
        b = OpenAIBackend("fake", srv.url, **FAST)
        recs = explain_features({0: cat_feature(0)}, [0], b, tmp_path / "r.jsonl",
                                ExplainConfig(scores=("detection", "fuzzing"), n_score=4, group_size=4),
                                progress=False)
        asked = Counter(body["messages"][0]["content"] for _, _, body in srv.requests)
    assert sum(p.startswith("We are") for p in asked) == 1 and len(asked) > 1
    assert all(n == FAST["max_retries"] + 1 for p, n in asked.items() if not p.startswith("We are"))
    rec = recs[0]
    assert rec["explanation"] and rec["status"] == "partial" and "detection" in rec["failure"]
    assert not_ok(recs) == recs


def test_server_down_mid_run_fails_the_rest_and_retry_failed_redoes_them(tmp_path):
    feats = {f: cat_feature(f) for f in range(3)}
    cfg = ExplainConfig(scores=("detection",), n_score=4, group_size=4, cache=False)
    out = tmp_path / "r.jsonl"
    with FakeServer(good, max_requests=30) as srv:
        b = OpenAIBackend("fake", srv.url, **FAST)
        first = explain_features(feats, [0], b, out, cfg, progress=False)
    # the server is gone now: feature 1 and 2 meet a closed port
    rest = explain_features(feats, [0, 1, 2], b, out, cfg, progress=False)
    assert first[0]["status"] == "ok" and [r["status"] for r in rest] == ["ok", "failed", "failed"]
    assert [r["feature"] for r in not_ok(read_results(out).values())] == [1, 2]
    with FakeServer(good, max_requests=30) as srv:
        b = OpenAIBackend("fake", srv.url, **FAST)
        again = explain_features(feats, [0, 1, 2], b, out, cfg, progress=False)
        assert srv.count == 0  # failed records are kept without the flag
        assert [r["status"] for r in again] == ["ok", "failed", "failed"]
        fixed = explain_features(feats, [0, 1, 2], b, out, ExplainConfig(**dict(vars(cfg), retry_failed=True)),
                                 progress=False)
        assert srv.count > 0
    assert [r["status"] for r in fixed] == ["ok", "ok", "ok"]


# ---------------------------------------------------------------- the explain command
def test_out_of_range_ids_rejected_before_any_request(tmp_path, fast_retries):
    stats = _stats_folder(tmp_path)
    with FakeServer(good, max_requests=5) as srv:
        with pytest.raises(MonoscopeError, match="out of range"):
            run_explain(stats, srv.url, "--features", "0", "10000")
        assert srv.count == 0
    assert not (stats / "explanations.jsonl").exists()


def test_explain_command_fails_loudly_and_rerun_points_at_retry_failed(tmp_path, fast_retries, capsys):
    stats = _stats_folder(tmp_path)
    refused = f"http://127.0.0.1:{closed_port()}/v1"
    assert run_explain(stats, refused, "--features", "0", "1") == 1
    cap = capsys.readouterr()
    assert f"explain: sending corpus text to {refused}" in cap.err
    assert "2 of 2 features not ok (" in cap.err and "ConnectionRefusedError" in cap.err
    assert "--retry-failed" in cap.err and "0/2 features ok" in cap.out
    assert run_explain(stats, refused, "--features", "0", "1") == 1
    assert "2 of 2 earlier records" in capsys.readouterr().err

    def script(n, body):
        prompt = body["messages"][0]["content"]
        return 200, chat("Explanation: tokens near the start" if prompt.startswith("We are") else "[1, 2]"), 0
    with FakeServer(script, max_requests=20) as srv:
        assert run_explain(stats, srv.url, "--features", "0", "1", "--retry-failed") == 0
        assert srv.count == 2 * 5  # per feature: explanation + two detection groups, two more for the token baseline
    assert [r["status"] for r in read_results(stats / "explanations.jsonl").values()] == ["ok", "ok"]


def test_cli_main_returns_1_when_features_fail(tmp_path, fast_retries):
    stats = _stats_folder(tmp_path)
    refused = f"http://127.0.0.1:{closed_port()}/v1"
    assert cli.main(["explain", "--stats", str(stats), "--features", "0", "--backend", f"openai:fake@{refused}",
                     "--scores", "detection"]) == 1


def test_module_has_no_default_remote_host():
    assert "api.openai.com" not in open(backends.__file__).read()


def test_unreadable_answers_are_an_outcome_not_an_outage(tmp_path, fast_retries, capsys):
    """A judge that answers, but not readably, leaves partial records and exit 0; only an outage exits 1."""
    stats = _stats_folder(tmp_path)

    def script(n, body):
        prompt = body["messages"][0]["content"]
        return 200, chat("Explanation: tokens near the start" if prompt.startswith("We are") else "hmm, hard to say"), 0
    with FakeServer(script, max_requests=40) as srv:
        assert run_explain(stats, srv.url, "--features", "0") == 0
    err = capsys.readouterr().err
    assert "did not settle" in err and "recorded as partial" in err and "--retry-failed" not in err
    [rec] = read_results(stats / "explanations.jsonl").values()
    assert rec["status"] == "partial" and "backend:" not in rec["failure"]


def test_an_outage_while_scoring_is_an_outage(tmp_path, fast_retries, capsys):
    stats = _stats_folder(tmp_path)

    def script(n, body):
        prompt = body["messages"][0]["content"]
        return (200, chat("Explanation: tokens near the start"), 0) if prompt.startswith("We are") else (500, "down", 0)
    with FakeServer(script, max_requests=80) as srv:
        assert run_explain(stats, srv.url, "--features", "0") == 1
    [rec] = read_results(stats / "explanations.jsonl").values()
    assert rec["status"] == "partial" and "(backend:" in rec["failure"]
    assert "--retry-failed" in capsys.readouterr().err
