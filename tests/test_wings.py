"""The package's two wings: conversion and fairseq hardening, their old import paths, and the switch that leaves
fairseq's functions unpatched."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import t2r_fairseq

OLD_PATHS = {
    "swap": "conversion", "calibration": "conversion",
    "checkpoint_errors": "hardening", "checkpoint_files": "hardening", "dataset_checks": "hardening",
    "fairseq_compat": "hardening", "fairseq_help": "hardening", "patching": "hardening",
}


@pytest.mark.parametrize("name", sorted(OLD_PATHS))
def test_old_import_paths_are_the_same_modules(name: str) -> None:
    new = importlib.import_module(f"t2r_fairseq.{OLD_PATHS[name]}.{name}")
    assert importlib.import_module(f"t2r_fairseq.{name}") is new
    assert getattr(t2r_fairseq, name) is new


def test_the_top_level_holds_only_the_package_entry_the_registry_and_the_shared_device_check() -> None:
    from pathlib import Path

    loose = sorted(p.name for p in Path(t2r_fairseq.__file__).parent.glob("*.py"))
    assert loose == ["__init__.py", "devices.py", "registry.py"], loose


_PROBE = """
import fairseq.checkpoint_utils as cu
from fairseq.trainer import Trainer
import t2r_fairseq
marks = lambda f: sorted(a for a in vars(f) if a.startswith('_t2r_patched_'))
print(marks(cu.load_checkpoint_to_cpu), marks(Trainer._build_optimizer), hasattr(__import__('numpy'), 'compat'))
"""


@pytest.mark.parametrize("switch, patched", [("", True), ("0", True), ("1", False)])
def test_one_switch_leaves_fairseq_unpatched(switch: str, patched: bool) -> None:
    """T2R_FAIRSEQ_UNPATCHED=1: fairseq's functions stay as fairseq wrote them; the plugin's own trainer hook
    (--feature-map-lr-scale) and the compatibility shims stay."""
    env = {**os.environ, "T2R_FAIRSEQ_UNPATCHED": switch, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    line = out.stdout.strip().splitlines()[-1]
    assert ("_t2r_patched_name_the_file" in line) == patched, line
    assert "_t2r_patched_scale_maps_after" in line and line.endswith("True"), line
