"""SAE training recipe at a fixed row budget: fidelity of each setting against the run's default recipe.

    python benchmarks/recipe.py --run runs/default '{"batch_size": 2048, "lr": null}' '{"epochs": 10}'

Each positional argument is a JSON object of TrainConfig fields (plus "epochs", passes over the run's training
store, default 3). The anchor, trained first, is the default run's own recipe: TopK, d_sae 4096, k 32,
3 epochs, the default batch and lr (512, 1e-3; before commit 92a624a: 2048 and the 1/sqrt(m) rule, which
'{"batch_size": 2048, "lr": null}' gives). Every SAE is scored on the run's validation store, with the
spliced LM on ``--lm-contexts`` held-out contexts. Prints one JSON row per setting and its CE-loss-recovered
gain over the anchor. Fidelity does not depend on the machine's load; the train seconds do.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from monoscope.evaluate import evaluate_sae
from monoscope.store import ActivationStore
from monoscope.train import TrainConfig, train_sae

ANCHOR = {"architecture": "topk", "d_sae": 4096, "k": 32, "seed": 0}  # batch and lr: TrainConfig's defaults


def score(spec: dict, run: Path, hook: str, lm_contexts: int, out: Path) -> dict:
    spec = {**ANCHOR, **spec}
    epochs = spec.pop("epochs", 3)
    rows = ActivationStore(run / "extract" / "train").num_rows
    cfg = TrainConfig(**spec, tokens=int(epochs * rows), hook=hook)
    started = time.perf_counter()
    train_sae(cfg, run / "extract" / "train", out)
    seconds = time.perf_counter() - started
    r = evaluate_sae(out, run / "extract" / "validation", lm_contexts=lm_contexts, hook=hook, show_progress=False)
    return {"setting": spec | {"epochs": epochs}, "train_s": round(seconds, 1), "l0": round(r["l0"], 2),
            "fvu": round(r["fvu"], 4), "ce_loss_recovered": round(r["ce_loss_recovered"], 4),
            "delta_loss": round(r["delta_loss"], 3), "dead_fraction": round(r["dead_fraction"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="*", help="JSON objects of TrainConfig fields (and epochs)")
    p.add_argument("--run", type=Path, default=Path("runs/default"), help="a finished `monoscope run` folder")
    p.add_argument("--hook", default="layers.6.resid_post")
    p.add_argument("--lm-contexts", type=int, default=32)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        anchor = score({}, a.run, a.hook, a.lm_contexts, Path(tmp) / "anchor")
        print(json.dumps({"anchor": True, **anchor}), flush=True)
        for i, text in enumerate(a.settings):
            row = score(json.loads(text), a.run, a.hook, a.lm_contexts, Path(tmp) / str(i))
            row["ce_gain_over_anchor"] = round(row["ce_loss_recovered"] - anchor["ce_loss_recovered"], 4)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
