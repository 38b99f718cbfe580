"""SAELens release names of the Gemma Scope SAEs, ``RELEASE/SAE_ID``, found in the local Hugging Face cache.

| SAELens release                                   | hub repository                  | folder in it               |
|---------------------------------------------------|---------------------------------|----------------------------|
| ``gemma-scope-2-{size}-{pt|it}-{res|mlp|att}``     | ``google/gemma-scope-2-{size}-{pt|it}`` | ``{resid_post|mlp_out|attn_out}/SAE_ID`` |
| the same with ``-all`` (every layer)              | the same                        | ``{…}_all/SAE_ID``           |
| ``gemma-scope-{2b|9b|27b}-{pt|it}-{res|mlp|att}``  | the release name under ``google/`` | ``SAE_ID`` (layer_N/width_W/average_l0_X) |

e.g. ``gemma-scope-2-270m-pt-res/layer_12_width_16k_l0_medium``. Nothing is downloaded: a release that is
not in the cache gets the ``hf download`` line that fetches exactly that SAE. Transcoder releases and the
``-canonical`` aliases (whose ids SAELens maps to a folder through its own table) are refused by name.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from monoscope.errors import MonoscopeError
from monoscope.hf_cache import hub_cache, snapshot

SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_out"}
SCOPE_2 = re.compile(r"^gemma-scope-2-(?P<size>\d+(?:\.\d+)?[mb])-(?P<kind>pt|it)-(?P<site>[a-z_]+?)(?P<all>-all)?$")
SCOPE_1 = re.compile(r"^gemma-scope-(?P<size>2b|9b|27b)-(?P<kind>pt|it)-(?P<site>[a-z_]+?)(?P<canonical>-canonical)?$")


def release_location(release: str) -> tuple[str, str] | None:
    """(hub repo, folder prefix inside it) of a Gemma Scope SAELens release name; None for any other name."""
    if m := SCOPE_2.match(release):
        if m["site"] not in SITES:
            raise MonoscopeError(f"{release!r} is not an SAE release (site {m['site']!r}); monoscope loads the "
                                 f"Gemma Scope 2 SAE releases ending in {', '.join('-' + s for s in SITES)} "
                                 f"(optionally -all); transcoders are not supported")
        return f"google/gemma-scope-2-{m['size']}-{m['kind']}", SITES[m["site"]] + ("_all/" if m["all"] else "/")
    if m := SCOPE_1.match(release):
        if m["site"] not in SITES:
            raise MonoscopeError(f"{release!r} is not an SAE release; Gemma Scope releases end in "
                                 f"{', '.join('-' + s for s in SITES)}")
        if m["canonical"]:
            raise MonoscopeError(f"{release!r} is a SAELens alias whose ids map to folders through SAELens's own "
                                 f"table; name the folder instead: {release.removesuffix('-canonical')}/"
                                 f"layer_N/width_16k/average_l0_X")
        return f"google/{release}", ""
    return None


def release_folder(name: str | os.PathLike) -> Path | None:
    """The cached folder of ``RELEASE/SAE_ID``; None when ``name`` is not a Gemma Scope release name."""
    release, _, sae_id = str(name).partition("/")
    location = release_location(release) if sae_id else None
    if location is None:
        return None
    repo, prefix = location
    inner = prefix + sae_id.strip("/")
    fetch = f"hf download {repo} --include '{inner}/*'"
    snap = snapshot(repo)
    if snap is None:
        raise MonoscopeError(f"{release!r} is the SAELens name of {repo}, which is not in the local Hugging Face "
                             f"cache ({hub_cache()}); nothing is downloaded at run time: fetch this SAE once with: "
                             f"{fetch}")
    # the SAE may have been fetched at an older revision than the one refs/main names now
    others = sorted((p for p in snap.parent.iterdir() if p.is_dir() and p != snap), key=lambda p: -p.stat().st_mtime)
    folder = next((s / inner for s in [snap, *others] if (s / inner).is_dir()), snap / inner)
    if not folder.is_dir():
        here = sorted(p.relative_to(snap / prefix).as_posix() for p in (snap / prefix).rglob("params.*")
                      ) if (snap / prefix).is_dir() else []
        cached = ", ".join(str(Path(h).parent) for h in here[:6]) or "none"
        raise MonoscopeError(f"{repo} in the local Hugging Face cache has no {inner!r} (cached ids of {release}: "
                             f"{cached}); fetch it once with: {fetch}")
    return folder
