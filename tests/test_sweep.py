"""monoscope.sweep: which knob each architecture is swept over comes from the architecture's class."""
from __future__ import annotations

import pytest

from monoscope.errors import MonoscopeError
from monoscope.sweep import SweepConfig, grid_runs, train_config_for, sweep_knob


def test_knob_per_architecture():
    cfg = SweepConfig(architectures=("topk", "batchtopk", "matryoshka", "jumprelu", "relu", "gated"))
    assert [sweep_knob(cfg, a) for a in cfg.architectures] == ["k", "k", "k", "target_l0", "l1_coefficient",
                                                               "l1_coefficient"]
    # explicit JumpReLU L0 coefficients take precedence over the target-L0 values
    assert sweep_knob(SweepConfig(l0_values=(0.5,)), "jumprelu") == "l0_coefficient"


def test_runs_and_their_train_configs():
    cfg = SweepConfig(architectures=("topk", "jumprelu"), k_values=(8, 16), target_l0_values=(20,), d_sae=64)
    runs = grid_runs(cfg)
    assert runs == [("topk", "k", 8), ("topk", "k", 16), ("jumprelu", "target_l0", 20.0)]
    assert isinstance(runs[0][2], int) and isinstance(runs[2][2], float)
    tc = train_config_for(cfg, *runs[2])
    assert tc.architecture == "jumprelu" and tc.target_l0 == 20.0 and tc.d_sae == 64


def test_errors():
    with pytest.raises(MonoscopeError, match="unknown architecture 'banana'.*relu, topk"):
        grid_runs(SweepConfig(architectures=("banana",)))
    with pytest.raises(MonoscopeError, match="no values to sweep for jumprelu .set --l0-values or --target-l0-values"):
        grid_runs(SweepConfig(architectures=("jumprelu",), target_l0_values=()))
    with pytest.raises(MonoscopeError, match="--k-values"):
        grid_runs(SweepConfig(architectures=("topk",), k_values=()))
