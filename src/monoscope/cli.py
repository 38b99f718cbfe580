"""The ``monoscope`` command: one subcommand per stage.

Each subcommand's flags come from its stage's config dataclass (monoscope.config), so the CLI, the
Python API and the saved configs never drift apart. A MonoscopeError prints one line and exits with 2.
"""
from __future__ import annotations

import argparse
import sys

from monoscope.config import add_arguments, from_namespace
from monoscope.errors import MonoscopeError, MonoscopeWarning

# ---------------------------------------------------------------- foundation
def _setup_extract(p: argparse.ArgumentParser):
    from monoscope.extract import ExtractConfig

    add_arguments(p, ExtractConfig)
    p.add_argument("--out", required=True, help="store folder to create or resume")

    def run(ns):
        from monoscope.extract import extract

        store = extract(from_namespace(ExtractConfig, ns), ns.out)
        print(store.describe())
    return run


def _setup_info(p: argparse.ArgumentParser):
    p.add_argument("folder", help="a monoscope artifact folder (activation store, SAE, ...)")
    p.add_argument("--verify", action="store_true", help="recompute every shard's checksum")

    def run(ns):
        from monoscope.sae.formats import describe_sae, is_sae_folder
        from monoscope.store import ActivationStore

        if is_sae_folder(ns.folder):  # any layout load_sae reads: format, architecture, hook, widths, sparsity
            print(describe_sae(ns.folder))
            return
        store = ActivationStore(ns.folder, allow_unfinished=True)
        if ns.verify:
            store.verify()
        print(store.describe())
        if ns.verify:
            print("verify: every shard matches its checksum")
    return run


def _setup_hookpoints(p: argparse.ArgumentParser):
    p.add_argument("model", nargs="?", default="gemma-3-270m", help="model name or folder")

    def run(ns):
        from monoscope.hookpoints import describe
        from monoscope.models import load_model

        lm = load_model(ns.model)
        print(f"# {lm.name} ({lm.family}, {lm.n_layers} layers, d_model {lm.d_model})")
        for name, width in describe(lm.model):
            print(f"{name}\t{width}")
    return run


def _lazy(target: str):
    """A setup function imported only when its subcommand is built (keeps `monoscope --help` fast)."""
    def setup(p):
        import importlib

        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)(p)
    return setup


SETUPS = {
    "run": ("the main job: extract, train SAEs, probe, interpret, steer and report", _lazy("monoscope.pipeline:setup_run")),
    "extract": ("capture activations at hook points into a store", _setup_extract),
    "info": ("describe an activation store or an SAE folder (any format load_sae reads)", _setup_info),
    "hookpoints": ("list a model's hook points and their widths", _setup_hookpoints),
    "train": ("train a sparse autoencoder on a store", _lazy("monoscope.train:setup_train")),
    "evaluate": ("evaluate an SAE: reconstruction, sparsity, spliced-in LM loss", _lazy("monoscope.evaluate:setup_evaluate")),
    "finetune": ("KL fine-tune an SAE so the model runs well on it (L0 unchanged)",
                 _lazy("monoscope.finetune:setup_finetune")),
    "sweep": ("train and evaluate a grid of SAEs; frontier plots", _lazy("monoscope.sweep:setup_sweep")),
    "synth": ("train SAEs on a synthetic model with known features and score them against it (SynthSAEBench)",
              _lazy("monoscope.synth.bench:setup_synth")),
    "probe": ("k-sparse probing of neurons or SAE latents", _lazy("monoscope.probing.run:setup_probe")),
    "datasets": ("list the built-in probing datasets", _lazy("monoscope.probing.run:setup_datasets")),
    "stats": ("one-pass feature statistics of an SAE or of neurons", _lazy("monoscope.interpret.stats:setup_stats")),
    "explain": ("automated explanations and scores of features", _lazy("monoscope.interpret.autointerp:setup_explain")),
    "steer": ("generate with SAE features clamped, added or ablated", _lazy("monoscope.interpret.steer:setup_steer")),
    "specificity": ("which SAE features are specific to a labelled concept", _lazy("monoscope.interpret.specificity:setup_specificity")),
    "browser": ("build the static feature browser", _lazy("monoscope.report.browser:setup_browser")),
    "serve": ("serve a feature browser with live search on 127.0.0.1", _lazy("monoscope.report.serve:setup_serve")),
}


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="monoscope", description="Find and show the features inside language models.")
    from monoscope import __version__

    parser.add_argument("--version", action="version", version=f"monoscope {__version__}")
    parser.add_argument("--verbose", action="store_true", help="also show other libraries' warnings (anywhere on "
                                                               "the command line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners = {}
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (helptext, setup) in SETUPS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if chosen is None or name == chosen:
            runners[name] = setup(p)
    return parser, runners


def quiet_libraries(verbose: bool = False) -> None:
    """Keep other libraries' warnings (torch, transformers: deprecations, sparse-tensor notes) out of normal
    output; ``--verbose`` shows them. monoscope's own warnings always show, as one line each."""
    import logging
    import os
    import warnings

    plain = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: (
        f"monoscope: warning: {message}\n" if issubclass(category, MonoscopeWarning)
        else plain(message, category, *a, **k))
    if verbose:
        return
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("default", category=MonoscopeWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "accelerate", "gguf", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    quiet_libraries(verbose)
    parser, runners = build_parser(argv)
    ns = parser.parse_args(argv)
    try:
        status = runners[ns.command](ns) or 0
    except MonoscopeError as exc:
        print(f"monoscope {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("monoscope: interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
