"""What ``--user-dir t2r_fairseq`` registers with fairseq, written down once, and the old import paths.

The lists below are the plugin's public surface on fairseq's command line: a model, architecture, criterion or
option that appears or disappears changes what users' commands and checkpoints mean, so a change here is
deliberate. Each model's options are the ones the plugin adds to those of the fairseq model it extends (the
first fairseq class in its MRO), which must all still be there.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any, Dict, Set

import pytest
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY, MODEL_REGISTRY

import t2r_fairseq  # noqa: F401  (registration, as --user-dir)

MODELS = {
    "shatter_roberta": "ShatterRobertaModel",
    "shatter_transformer": "ShatterTransformerModel",
    "t2r_transformer": "T2RTransformerModel",
    "t2r_transformer_lm": "T2RTransformerLanguageModel",
    "topk_transformer": "TopkTransformerModel",
    "topk_transformer_lm": "TopkTransformerLanguageModel",
}

# Architecture -> the model it builds; ``roberta_small`` is the plugin's preset of fairseq's own ``roberta``.
ARCHITECTURES = {
    "roberta_small": "roberta",
    "shatter_roberta_base": "shatter_roberta",
    "shatter_roberta_small": "shatter_roberta",
    "shatter_transformer": "shatter_transformer",
    "shatter_transformer_iwslt_de_en": "shatter_transformer",
    "t2r_transformer": "t2r_transformer",
    "t2r_transformer_iwslt_de_en": "t2r_transformer",
    "t2r_transformer_lm_gpt": "t2r_transformer_lm",
    "t2r_transformer_lm_wiki103": "t2r_transformer_lm",
    "t2r_transformer_vaswani_wmt_en_de_big": "t2r_transformer",
    "t2r_transformer_vaswani_wmt_en_fr_big": "t2r_transformer",
    "t2r_transformer_wmt_en_de": "t2r_transformer",
    "t2r_transformer_wmt_en_de_big": "t2r_transformer",
    "topk_transformer": "topk_transformer",
    "topk_transformer_iwslt_de_en": "topk_transformer",
    "topk_transformer_lm_big": "topk_transformer_lm",
    "topk_transformer_lm_gpt": "topk_transformer_lm",
    "topk_transformer_lm_wiki103": "topk_transformer_lm",
    "topk_transformer_vaswani_wmt_en_de_big": "topk_transformer",
    "topk_transformer_vaswani_wmt_en_fr_big": "topk_transformer",
    "topk_transformer_wmt_en_de": "topk_transformer",
    "topk_transformer_wmt_en_de_big": "topk_transformer",
}

CRITERIA = ["t2r_attention_transfer"]

_SHATTER = ["--shatter-degree", "--shatter-key-projection", "--shatter-max-distance",
            "--shatter-no-position-score-bias", "--shatter-partitions", "--shatter-score"]
_LINEAR = ["--decode-step", "--feature-map", "--feature-map-lr-scale", "--feature-size", "--linear-chunk-size",
           "--linear-eps", "--linear-kernel", "--reset-feature-maps", "--sliding-window", "--trainable"]
_TOPK = ["--topk-attention", "--topk-ffn-k", "--topk-k", "--topk-query-chunk"]

# Model -> (the fairseq model it extends, the options it adds).
OPTIONS: Dict[str, tuple] = {
    "shatter_roberta": ("RobertaModel", sorted(_SHATTER + ["--shatter-absolute-positions"])),
    "shatter_transformer": ("TransformerModel", sorted(_SHATTER + ["--encoder-attention"])),
    "t2r_transformer": ("TransformerModel", sorted(
        _LINEAR + _SHATTER + ["--cross-feature-size", "--encoder-attention", "--softmax-cross-attention",
                              "--swap-encoder"])),
    "t2r_transformer_lm": ("TransformerLanguageModel", sorted(_LINEAR + ["--carry-state"])),
    "topk_transformer": ("TransformerModel", sorted(_TOPK)),
    "topk_transformer_lm": ("TransformerLanguageModel", sorted(_TOPK)),
}

# ``--encoder-attention``: the same choices on both models that take it, each model's own default.
ENCODER_ATTENTION = {"t2r_transformer": "multihead", "shatter_transformer": "shatter"}


def _ours(obj: Any) -> bool:
    return getattr(obj, "__module__", "").startswith("t2r_fairseq")


def _parser(model: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    model.add_args(parser)
    return parser


def _flags(model: type) -> Set[str]:
    return {s for a in _parser(model)._actions for s in a.option_strings if s.startswith("--")}


def _fairseq_base(model: type) -> type:
    return next(k for k in model.__mro__ if k.__module__.startswith("fairseq."))


def test_models() -> None:
    ours = {name: cls.__name__ for name, cls in MODEL_REGISTRY.items() if _ours(cls)}
    assert ours == MODELS


def test_architectures() -> None:
    ours = {arch: ARCH_MODEL_REGISTRY[arch] for arch, fn in ARCH_CONFIG_REGISTRY.items() if _ours(fn)}
    assert {arch: cls.__name__ for arch, cls in ours.items()} == {
        arch: MODEL_REGISTRY[model].__name__ for arch, model in ARCHITECTURES.items()}
    for arch, model in ARCHITECTURES.items():
        assert ARCH_MODEL_REGISTRY[arch] is MODEL_REGISTRY[model], arch


def test_criteria() -> None:
    assert sorted(name for name, cls in CRITERION_REGISTRY.items() if _ours(cls)) == CRITERIA


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_model_options(name: str) -> None:
    model = MODEL_REGISTRY[name]
    base_name, added = OPTIONS[name]
    base = _fairseq_base(model)
    assert base.__name__ == base_name
    mine, theirs = _flags(model), _flags(base)
    assert theirs <= mine, sorted(theirs - mine)
    assert sorted(mine - theirs) == added


@pytest.mark.parametrize("name", sorted(ENCODER_ATTENTION))
def test_encoder_attention_choices_and_default(name: str) -> None:
    action = next(a for a in _parser(MODEL_REGISTRY[name])._actions if "--encoder-attention" in a.option_strings)
    assert list(action.choices) == ["multihead", "shatter"]
    assert action.default == ENCODER_ATTENTION[name]


# Old import path -> new one; both must be the very same module object.
MOVED: Dict[str, str] = {
    "t2r_fairseq.ops.shatter": "t2r_fairseq.shatter.ops",
    "t2r_fairseq.modules.shatter_attention": "t2r_fairseq.shatter.attention",
    "t2r_fairseq.models.shatter_config": "t2r_fairseq.shatter.config",
    "t2r_fairseq.models.shatter_layers": "t2r_fairseq.shatter.layers",
    "t2r_fairseq.models.shatter_transformer": "t2r_fairseq.shatter.transformer",
    "t2r_fairseq.models.shatter_roberta": "t2r_fairseq.shatter.roberta",
    "t2r_fairseq.ops.topk_attention": "t2r_fairseq.topk.ops",
    "t2r_fairseq.modules.topk_multihead_attention": "t2r_fairseq.topk.multihead_attention",
    "t2r_fairseq.modules.topk_feed_forward": "t2r_fairseq.topk.feed_forward",
    "t2r_fairseq.models.topk_config": "t2r_fairseq.topk.config",
    "t2r_fairseq.models.topk_layers": "t2r_fairseq.topk.layers",
    "t2r_fairseq.models.topk_transformer": "t2r_fairseq.topk.transformer",
    "t2r_fairseq.models.topk_transformer_lm": "t2r_fairseq.topk.transformer_lm",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_paths_are_the_same_modules(old: str) -> None:
    new = importlib.import_module(MOVED[old])
    assert importlib.import_module(old) is new
    parent, _, leaf = old.rpartition(".")
    assert getattr(importlib.import_module(parent), leaf) is new



def _plugin_imports(path) -> Set[str]:  # noqa: ANN001
    """The ``t2r_fairseq.X`` packages (or top-level modules) that one source file imports."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        found |= {n.split(".")[1] for n in names if n.startswith("t2r_fairseq.")}
    return found


# What each layer may import of the plugin: the house is one-way, ops -> modules -> models / conversion, and the
# attention families (topk, shatter) sit above models, which reach them only through registries they fill.
ALLOWED = {
    "ops": {"ops"},
    "modules": {"ops", "modules"},
    "models": {"ops", "modules", "models", "conversion"},
    "conversion": {"ops", "modules", "conversion"},
    "topk": {"ops", "modules", "models", "topk"},
    "shatter": {"ops", "modules", "models", "shatter"},
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downwards(layer: str) -> None:
    from pathlib import Path

    root = Path(t2r_fairseq.__file__).parent
    for path in sorted((root / layer).rglob("*.py")):
        assert _plugin_imports(path) <= ALLOWED[layer], (path.name, sorted(_plugin_imports(path) - ALLOWED[layer]))
