"""``monoscope serve``: the feature browser over local HTTP, plus a live search endpoint.

    serve("runs/browser", lm=load_model("gemma-3-270m"), sae=load_sae("runs/sae"))

Standard library only (``http.server.ThreadingHTTPServer``). Binds 127.0.0.1 by default. Routes:

- ``GET /...``: the static files of the browser folder (no directory listings; nothing outside the folder).
- ``GET /api/info``: ``{"live": bool, "model", "hook", "sae", "kind"}``.
- ``POST /api/activations`` with JSON ``{"text": "...", "top_n": 10}``: runs the model (and SAE) on the text
  and answers ``{"tokens": [{"text": tok, "features": [[id, activation], ...]}, ...], "truncated": bool}``.
  Only ``Content-Type: application/json`` is accepted (a cross-site form cannot send it without a CORS
  preflight, which this server never grants) and the Host header must name this server, so other web
  pages cannot drive the model through the user's browser.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from monoscope.artifacts import read_json
from monoscope.errors import MonoscopeError

MAX_BODY = 64 * 1024
MAX_TOKENS = 512
MAX_TOP_N = 50
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# ------------------------------------------------------------------------------------------ computation
def activations_for_text(lm, sae, hook: str | None, text: str, top_n: int = 10,
                         max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """Tokenise ``text`` (with BOS, like the statistics pass), run the model to ``hook`` and encode.

    With ``sae=None`` the raw activations at ``hook`` are ranked instead (a neuron browser). Returns
    ``{"tokens": [{"text", "features": [[id, act], ...]}], "truncated", "hook"}``; the BOS token is left
    out. Only positive activations are listed, largest first, at most ``top_n`` per token.
    """
    import torch

    from monoscope.hookpoints import run_with_capture

    if not isinstance(text, str) or not text.strip():
        raise MonoscopeError("give some non-empty text to search for")
    if not isinstance(top_n, int) or isinstance(top_n, bool) or not 1 <= top_n <= MAX_TOP_N:
        raise MonoscopeError(f"top_n must be an integer from 1 to {MAX_TOP_N}, got {top_n!r}")
    hook = hook or (getattr(getattr(sae, "cfg", None), "hook_name", "") if sae is not None else "")
    if not hook:
        raise MonoscopeError("no hook point given and the SAE does not name one; pass hook=, e.g. layers.6.resid_post")
    tok = lm.tokenizer
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    truncated = len(ids) > max_tokens
    ids = ids[:max_tokens]
    bos = getattr(tok, "bos_token_id", None)
    prefix = [bos] if bos is not None else []
    if not ids:
        raise MonoscopeError("the text gave no tokens")
    device = next(lm.model.parameters()).device
    input_ids = torch.tensor([prefix + ids], device=device)
    with torch.no_grad():
        acts = run_with_capture(lm.model, [hook], input_ids)[hook][0, len(prefix):]
        values = sae.encode(acts) if sae is not None else acts
        values = values.float()
        k = min(top_n, values.shape[-1])
        top_v, top_i = values.topk(k, dim=-1)
    tokens = []
    for pos, tid in enumerate(ids):
        feats = [[int(i), round(float(v), 5)] for v, i in zip(top_v[pos].tolist(), top_i[pos].tolist()) if v > 0]
        tokens.append({"text": tok.decode([tid]), "features": feats})
    return {"tokens": tokens, "truncated": truncated, "hook": hook}


# ------------------------------------------------------------------------------------------ HTTP
class _App:
    """What the request handler needs: the folder, the model/SAE and a lock so one forward runs at a time."""

    def __init__(self, folder: Path, lm=None, sae=None, hook: str | None = None, kind: str = "features"):
        self.folder = folder
        self.lm, self.sae, self.hook, self.kind = lm, sae, hook, kind
        self.lock = threading.Lock()
        self.allowed_hosts: set[str] = set()

    @property
    def live(self) -> bool:
        return self.lm is not None and bool(self.hook)

    def info(self) -> dict:
        return {"live": self.live, "model": getattr(self.lm, "name", None), "hook": self.hook,
                "sae": self.sae is not None, "kind": self.kind}


class BrowserHandler(SimpleHTTPRequestHandler):
    server_version = "monoscope"
    sys_version = ""

    def __init__(self, *args, app: _App, **kwargs):
        self.app = app
        super().__init__(*args, directory=str(app.folder), **kwargs)

    # -- quiet logs ---------------------------------------------------------------------------------------
    def log_message(self, format, *args):  # noqa: A002 - name from the base class
        if os.environ.get("MONOSCOPE_SERVE_LOG"):
            super().log_message(format, *args)

    def end_headers(self):
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    # -- static files -------------------------------------------------------------------------------------
    def translate_path(self, path: str) -> str:
        """The base class drops '..' segments; also refuse anything that resolves outside the folder."""
        full = Path(super().translate_path(path)).resolve()
        root = self.app.folder.resolve()
        if full != root and root not in full.parents:
            return str(root / "__outside__")  # does not exist → 404
        return str(full)

    def list_directory(self, path):
        self.send_error(HTTPStatus.NOT_FOUND, "no directory listings")
        return None

    def do_GET(self):
        route = urlsplit(self.path).path
        if route.startswith("/api/"):
            if route == "/api/info":
                return self._json(HTTPStatus.OK, self.app.info())
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {unquote(route)}"})
        if route == "/":
            self.path = "/index.html"
        return super().do_GET()

    def do_HEAD(self):
        if urlsplit(self.path).path.startswith("/api/"):
            return self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use GET or POST"})
        return super().do_HEAD()

    # -- API ----------------------------------------------------------------------------------------------
    def do_POST(self):
        route = urlsplit(self.path).path
        if route != "/api/activations":
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {unquote(route)}"})
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send JSON (Content-Type: application/json)"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > MAX_BODY else HTTPStatus.BAD_REQUEST,
                              {"error": f"the body must be JSON of at most {MAX_BODY} bytes"})
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8"))
            if not isinstance(body, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": 'expected a JSON object like {"text": "..."}'})
        try:
            str(body.get("text", "")).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ('\ud800') is valid JSON but no text a tokenizer can read
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "the text holds an unpaired surrogate; send UTF-8 text"})
        if not self.app.live:
            return self._json(HTTPStatus.SERVICE_UNAVAILABLE, {
                "error": "live search is off: start `monoscope serve` with --sae (or --model for neurons)"})
        try:
            with self.app.lock:
                result = activations_for_text(self.app.lm, self.app.sae, self.app.hook, body.get("text"),
                                              top_n=body.get("top_n", 10))
        except MonoscopeError as exc:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        return self._json(HTTPStatus.OK, result)

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        return not self.app.allowed_hosts or host in self.app.allowed_hosts

    def _json(self, status: HTTPStatus, data: dict):
        raw = json.dumps(data, ensure_ascii=True).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)


def make_server(browser_folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, lm=None, sae=None,
                hook: str | None = None) -> ThreadingHTTPServer:
    """A ready, not yet running server (``port=0`` picks a free port: see ``server.server_address``)."""
    folder = Path(browser_folder)
    if not (folder / "index.html").exists():
        raise MonoscopeError(f"{folder} has no index.html; build the browser first with "
                             f"`monoscope browser --stats STATS --out {folder}`")
    meta = read_json(folder / "browser.json") if (folder / "browser.json").exists() else {}
    kind = meta.get("kind", "features")
    if sae is not None:
        hook = hook or getattr(sae.cfg, "hook_name", "") or meta.get("hook")
    elif lm is not None:
        hook = hook or meta.get("hook")
    if sae is not None and lm is None:
        raise MonoscopeError("an SAE needs its model for live search: pass lm= (CLI: --model NAME)")
    if kind == "features" and lm is not None and sae is None:
        raise MonoscopeError("this browser shows SAE features: live search needs the SAE too (CLI: --sae DIR)")
    app = _App(folder, lm=lm, sae=sae, hook=hook, kind=kind)
    try:
        server = ThreadingHTTPServer((host, port), partial(BrowserHandler, app=app))
    except OSError as exc:
        raise MonoscopeError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    server.daemon_threads = True
    server.app = app  # type: ignore[attr-defined]
    bound_port = server.server_address[1]
    names = {host, "localhost", "127.0.0.1", "[::1]"}
    app.allowed_hosts = {f"{n}:{bound_port}" for n in names} | ({n for n in names} if bound_port == 80 else set())
    if host in ("0.0.0.0", "::", ""):
        app.allowed_hosts = set()  # reachable under any name the user chose; no check possible
    return server


def serve(browser_folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, lm=None, sae=None,
          hook: str | None = None) -> None:
    """Serve the browser until interrupted (Ctrl-C)."""
    server = make_server(browser_folder, host, port, lm=lm, sae=sae, hook=hook)
    h, p = server.server_address[:2]
    shown = f"[{h}]" if ":" in str(h) else h
    app = server.app  # type: ignore[attr-defined]
    mode = f"live search with {app.info()['model']} at {app.hook}" if app.live else "static search only"
    print(f"serving {browser_folder} on http://{shown}:{p}/ ({mode}); Ctrl-C stops", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: the server is reachable from other machines and has no authentication", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@dataclass
class ServeConfig:
    """Flags of ``monoscope serve`` (the browser folder is its one positional argument)."""
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (default: 127.0.0.1, this machine only)"})
    port: int = field(default=8000, metadata={"help": "port (default: 8000; 0 picks a free one)"})
    sae: str | None = field(default=None, metadata={"help": "SAE folder: enables live search over its features"})
    model: str | None = field(default=None, metadata={
        "help": "model for live search (default: the SAE's model, else the browser's model when --sae is not "
                "given and the browser shows neurons)"})
    hook: str | None = field(default=None, metadata={"help": "hook point (default: the SAE's, else the browser's)"})
    device: str = field(default="cpu", metadata={"help": "torch device for live search"})


def setup_serve(p):
    """Flags of ``monoscope serve``; returns the function that runs it."""
    from monoscope.config import add_arguments, from_namespace

    p.add_argument("folder", help="feature browser folder (monoscope browser)")
    add_arguments(p, ServeConfig)

    def run(ns):
        cfg = from_namespace(ServeConfig, ns)
        folder = Path(ns.folder)
        meta = read_json(folder / "browser.json") if (folder / "browser.json").exists() else {}
        sae = lm = None
        if cfg.sae:
            from monoscope.sae import load_sae

            sae = load_sae(cfg.sae, device=cfg.device)
        model_name = cfg.model or (getattr(sae.cfg, "model_name", "") if sae is not None else "") or (
            meta.get("model") if (sae is not None or meta.get("kind") == "neurons") and cfg.model is None else None)
        if sae is not None and not model_name:
            raise MonoscopeError(f"the SAE in {cfg.sae} does not name its model; pass --model NAME")
        if model_name:
            from monoscope.models import load_model

            lm = load_model(model_name, device=cfg.device)
        serve(folder, host=cfg.host, port=cfg.port, lm=lm, sae=sae, hook=cfg.hook)
    return run
