"""Text-completion backends for automated interpretability: a local Hugging Face LM or an HTTP API.

Every backend has ``complete(prompt, max_tokens=, temperature=) -> str`` (raises ``BackendError`` when
no answer could be had) and ``complete_batch(prompts, ...) -> list[str | BackendError]`` (never raises
for one bad prompt: its slot holds the error). ``identity`` names the backend for caches and records.

Backend specs for ``make_backend``::

    hf:gemma-3-270m                      built-in or local Hugging Face causal LM (see monoscope.models)
    hf:/path/to/model
    openai:MODEL@http://127.0.0.1:8000/v1  OpenAI-compatible chat API at that base URL
    openai:MODEL                         base URL from $MONOSCOPE_OPENAI_BASE_URL (no default host)
    openai-completions:MODEL@URL         the legacy /completions endpoint instead of /chat/completions

The base URL must be an explicit http:// or https:// URL: corpus text is never sent to a host nobody named.
Each HTTP backend prints the host that receives corpus text to stderr once, before its first request.
The API key comes from the argument or $OPENAI_API_KEY (a local server usually needs none).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from monoscope.artifacts import atomic_path
from monoscope.errors import MonoscopeError


class BackendError(Exception):
    """One completion could not be had (network, HTTP status, unreadable response). Recorded, not fatal."""


class MalformedResponse(BackendError):
    """A 200 answer without usable text (not JSON, no choices); retried like a transient failure."""


@runtime_checkable
class Backend(Protocol):
    identity: str

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0) -> str: ...

    def complete_batch(self, prompts: list[str], *, max_tokens: int = 256,
                       temperature: float = 0.0) -> list[str | BackendError]: ...


class BaseBackend:
    """Gives ``complete_batch`` as a loop over ``complete`` that keeps each prompt's error in its slot."""

    identity = "base"

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0) -> str:
        raise NotImplementedError

    def complete_batch(self, prompts: list[str], *, max_tokens: int = 256,
                       temperature: float = 0.0) -> list[str | BackendError]:
        return [_try(self.complete, p, max_tokens, temperature) for p in prompts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity!r})"


def _try(fn: Callable[..., str], prompt: str, max_tokens: int, temperature: float) -> str | BackendError:
    try:
        return fn(prompt, max_tokens=max_tokens, temperature=temperature)
    except BackendError as exc:
        return exc
    except Exception as exc:  # a backend bug must not sink a long run; record it
        return BackendError(f"{type(exc).__name__}: {exc}")


class CallableBackend(BaseBackend):
    """Wrap a plain function ``fn(prompt) -> str`` (scripted answers in tests, custom clients)."""

    def __init__(self, fn: Callable[[str], str], identity: str = "callable"):
        self.fn = fn
        self.identity = identity

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0) -> str:
        return self.fn(prompt)


# ---------------------------------------------------------------- local Hugging Face model
class HFBackend(BaseBackend):
    """Generate with a local causal LM (a ``LoadedModel`` or a name for ``monoscope.models.load_model``).

    Uses the tokenizer's chat template when it has one, else the plain prompt. ``temperature=0`` is greedy
    decoding; otherwise sampling seeded by ``seed`` plus a per-call counter (reproducible in order).
    Long prompts are cut from the left to fit the model's context.
    """

    def __init__(self, lm: Any = "gemma-3-270m", device: str = "cpu", seed: int = 0):
        from monoscope.models import load_model

        self.lm = load_model(lm, device=device) if isinstance(lm, str) else lm
        self.identity = f"hf:{self.lm.name}:{self.lm.fingerprint}"
        self.seed = seed
        self._calls = 0
        self._lock = threading.Lock()

    def _encode(self, prompt: str, max_tokens: int) -> tuple[list[int], int]:
        """Prompt ids (cut from the left to fit the context) and the number of new tokens allowed."""
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt)["input_ids"]
        config = self.lm.model.config.get_text_config()
        limit = getattr(config, "max_position_embeddings", None) or 4096
        new = max(1, min(max_tokens, limit // 2))
        return list(ids[-(limit - new):]), new

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0) -> str:
        import torch

        tok = self.lm.tokenizer
        ids, new = self._encode(prompt, max_tokens)
        x = torch.tensor([ids], device=self.lm.device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        kwargs: dict[str, Any] = dict(max_new_tokens=new, pad_token_id=pad)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self._lock, torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self._calls)
            self._calls += 1
            out = self.lm.model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
        return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


# ---------------------------------------------------------------- OpenAI-compatible HTTP API
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIBackend(BaseBackend):
    """An OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama, ...) over plain ``urllib``.

    Retries 429/5xx, timeouts, connection errors and malformed 200 answers (not JSON, no text) up to
    ``max_retries`` times with exponential backoff (honouring ``Retry-After``); another 4xx raises
    ``BackendError`` at once.
    ``complete_batch`` sends up to ``concurrency`` requests at a time.
    """

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, max_retries: int = 4, concurrency: int = 4, backoff: float = 1.0,
                 max_backoff: float = 30.0, endpoint: str = "chat", extra: dict | None = None):
        if endpoint not in ("chat", "completions"):
            raise MonoscopeError(f"endpoint must be 'chat' or 'completions', not {endpoint!r}")
        if not model:
            raise MonoscopeError("OpenAIBackend needs a model name, e.g. openai:gpt-4o-mini@http://host/v1")
        base_url = _explicit_url(base_url or os.environ.get("MONOSCOPE_OPENAI_BASE_URL"), model)
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, max(1, concurrency)
        self.backoff, self.max_backoff = backoff, max_backoff
        self.endpoint = endpoint
        self.extra = dict(extra or {})
        self.identity = f"openai-{endpoint}:{model}@{self.base_url}"
        self._announced = False
        self._announce_lock = threading.Lock()

    def _announce(self) -> None:
        """Say once, on stderr, which host is about to receive corpus text."""
        with self._announce_lock:
            if not self._announced:
                print(f"explain: sending corpus text to {self.base_url}", file=sys.stderr, flush=True)
                self._announced = True

    def _request(self, prompt: str, max_tokens: int, temperature: float) -> tuple[str, dict]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature}
        if self.endpoint == "chat":
            url = self.base_url + "/chat/completions"
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            url = self.base_url + "/completions"
            body["prompt"] = prompt
        body.update(self.extra)
        return url, body

    def _post_once(self, url: str, body: dict) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return resp.read()

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0) -> str:
        url, body = self._request(prompt, max_tokens, temperature)
        self._announce()
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                raw = self._post_once(url, body)
                return self._text_of(raw)
            except urllib.error.HTTPError as exc:
                try:
                    detail = exc.read()[:200].decode(errors="replace")
                except Exception:  # noqa: BLE001 - the body is only for the message
                    detail = ""
                last = f"HTTP {exc.code} from {url}: {detail}".strip()
                if exc.code not in RETRY_STATUS:
                    raise BackendError(last) from None
                wait = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            except MalformedResponse as exc:
                last = f"{exc} (from {url})"
            except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError,
                    ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__} talking to {url}: {reason}"
            if attempt < self.max_retries:
                delay = self.backoff * 2 ** attempt * (0.5 + random.random() / 2)
                time.sleep(min(self.max_backoff, wait if wait is not None else delay))
        raise BackendError(f"gave up after {self.max_retries + 1} attempts; last error: {last}")

    def _text_of(self, raw: bytes) -> str:
        """Pull the completion text out of a response body, or raise BackendError saying what was wrong."""
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MalformedResponse(f"response is not JSON: {raw[:120]!r}") from None
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.endpoint == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise MalformedResponse(f"response has no choices[0] text: {str(data)[:200]}") from None
        if not isinstance(text, str):
            raise MalformedResponse(f"response text is {type(text).__name__}, not a string")
        return text

    def complete_batch(self, prompts: list[str], *, max_tokens: int = 256,
                       temperature: float = 0.0) -> list[str | BackendError]:
        if len(prompts) <= 1 or self.concurrency == 1:
            return super().complete_batch(prompts, max_tokens=max_tokens, temperature=temperature)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(lambda p: _try(self.complete, p, max_tokens, temperature), prompts))


def _explicit_url(url: str | None, model: str) -> str:
    """The base URL if it is an explicit http(s) URL; otherwise a MonoscopeError naming the fix."""
    fix = f"give the endpoint as openai:{model or 'MODEL'}@http://HOST:PORT/v1 (or set $MONOSCOPE_OPENAI_BASE_URL)"
    if not url:
        raise MonoscopeError(f"no endpoint for the openai backend; {fix}")
    if not url.startswith(("http://", "https://")):
        raise MonoscopeError(f"endpoint {url!r} is not an http:// or https:// URL; {fix}")
    return url


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


# ---------------------------------------------------------------- disk cache
class CachedBackend(BaseBackend):
    """Remember every successful completion on disk so a rerun never asks twice.

    Key: sha256 of (inner backend identity, prompt, max_tokens, temperature). One JSON file per answer,
    written atomically; failures are not cached, so a rerun retries them. With temperature > 0 the first
    sample is replayed on later calls.
    """

    def __init__(self, backend: Backend, cache_dir: str | os.PathLike):
        self.backend = backend
        self.cache_dir = Path(cache_dir)
        self.identity = backend.identity
        self.hits = 0
        self.misses = 0

    def _path(self, prompt: str, max_tokens: int, temperature: float) -> Path:
        key = json.dumps([self.backend.identity, prompt, max_tokens, float(temperature)])
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def _load(self, path: Path) -> str | None:
        try:
            return json.loads(path.read_text())["text"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _store(self, path: Path, prompt: str, text: str, max_tokens: int, temperature: float) -> None:
        record = {"identity": self.backend.identity, "max_tokens": max_tokens, "temperature": temperature,
                  "prompt": prompt, "text": text}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record))

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0) -> str:
        return self._unwrap(self.complete_batch([prompt], max_tokens=max_tokens, temperature=temperature)[0])

    @staticmethod
    def _unwrap(result: str | BackendError) -> str:
        if isinstance(result, BackendError):
            raise result
        return result

    def complete_batch(self, prompts: list[str], *, max_tokens: int = 256,
                       temperature: float = 0.0) -> list[str | BackendError]:
        paths = [self._path(p, max_tokens, temperature) for p in prompts]
        results: list[str | BackendError | None] = [self._load(p) for p in paths]
        todo = [i for i, r in enumerate(results) if r is None]
        self.hits += len(prompts) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = self.backend.complete_batch([prompts[i] for i in todo], max_tokens=max_tokens,
                                                temperature=temperature)
            for i, text in zip(todo, fresh):
                results[i] = text
                if isinstance(text, str):
                    self._store(paths[i], prompts[i], text, max_tokens, temperature)
        return results  # type: ignore[return-value]


# ---------------------------------------------------------------- specs
SPEC_HELP = ("backend spec: hf:MODEL (built-in name or local folder, e.g. hf:gemma-3-270m), "
             "openai:MODEL@BASE_URL (e.g. openai:llama3@http://127.0.0.1:8000/v1; BASE_URL must be an "
             "http(s) URL, else $MONOSCOPE_OPENAI_BASE_URL), or openai-completions:MODEL@BASE_URL")


def make_backend(spec: str, cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> Backend:
    """Build a backend from a spec string (see the module docstring); wrap it in a disk cache if asked.

    Extra keyword arguments go to the backend class (e.g. ``concurrency=8`` or ``device="cuda"``).
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise MonoscopeError(f"bad backend spec {spec!r}; {SPEC_HELP}")
    backend: Backend
    if kind == "hf":
        backend = HFBackend(rest, **kwargs)
    elif kind in ("openai", "openai-chat", "openai-completions"):
        at = re.search(r"@(?=https?://)", rest)  # the '@' that starts an http(s) URL
        model, url = (rest[:at.start()], rest[at.end():]) if at else (rest, None)
        if not at and "@" in rest:  # an endpoint without a scheme must never reach a default host
            model, _, url = rest.partition("@")
            _explicit_url(url, model)
        endpoint = "completions" if kind == "openai-completions" else "chat"
        backend = OpenAIBackend(model, url, endpoint=endpoint, **kwargs)
    else:
        raise MonoscopeError(f"unknown backend kind {kind!r} in {spec!r}; {SPEC_HELP}")
    return CachedBackend(backend, cache_dir) if cache_dir is not None else backend
