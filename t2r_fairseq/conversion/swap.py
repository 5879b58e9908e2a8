"""The swap: load a softmax transformer's weights into a T2R model, and refuse loads that would be silently wrong.

fairseq funnels every checkpoint load -- ``--finetune-from-model``,
``--restore-file`` with the ``--reset-*`` flags, ``load_model_ensemble`` -- through
``model.load_state_dict(state, strict=True, model_cfg=...)``. The T2R models
override that one method (:class:`SwapLoadMixin`), so the swap needs no flag and
no separate conversion step:

* a checkpoint that lacks exactly the feature-map tensors is a softmax teacher:
  every tensor it has is reused verbatim, the feature maps keep their fresh
  initialisation, and one summary line is logged;
* a checkpoint that has some linear-attention tensors is a T2R checkpoint, not a
  teacher: if it lacks the feature maps of some of this model's layers (it was
  trained with ``--softmax-cross-attention``, or without ``--swap-encoder``), the
  load stops with one line naming those layers and the flag that rebuilds the
  model as it was trained -- starting maps fresh in a trained T2R model is only
  done on request, with ``--reset-feature-maps`` (:func:`partial_swap_message`);
* a checkpoint that has them is a T2R checkpoint: a normal strict load, after
  checking that its feature maps are the ones this model builds. Shapes cannot
  tell (T2R's and Hedgehog's tensors coincide), so each map carries an integer
  identity record ``feature_map.spec`` (:mod:`t2r_fairseq.modules.feature_maps`)
  and each sliding-window layer its ``window_size``; a difference stops the load
  with one line naming both sides and the flag that fixes it, or, with
  ``--reset-feature-maps``, starts fresh maps of the model's kind and says so.
  A checkpoint saved before these records existed loads with one warning
  saying what is assumed;
* anything else (a shape mismatch, a tensor the T2R model has no place for,
  missing non-feature-map tensors) is a :class:`SwapError` whose one line says
  what differs -- layer counts, dimensions, vocabulary, feature maps -- and
  which flag to change (:func:`diagnose`).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from fairseq.utils import safe_getattr
from torch import Tensor

from t2r_fairseq.modules.feature_maps import SPEC_BUFFER, FeatureMapSpec
from t2r_fairseq.modules.sliding_window_attention import WINDOW_SIZE_BUFFER

logger = logging.getLogger(__name__)

# Parameters and buffers that exist only in the linear-attention model: the feature maps (with their identity
# record), and the per-head window factor and window size of the sliding-window hybrid (--sliding-window).
NEW_TENSOR_PATTERN = re.compile(r"(^|\.)(feature_map\.|window_logit$|window_size$)")
# The identity records among them: integer metadata saying what the weights mean, not weights.
RECORD_PATTERN = re.compile(rf"(^|\.)(feature_map\.{SPEC_BUFFER}|{WINDOW_SIZE_BUFFER})$")
_FEATURE_MAP = re.compile(r"^(.*?(?:^|\.)feature_map)\.")
_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.")

# Messages say CHECKPOINT where the path belongs; callers that know it substitute it (SwapError.for_checkpoint).
CHECKPOINT = "CHECKPOINT"
ARCH_FLAGS_HINT = f"python -m t2r_fairseq.tools.arch_flags {CHECKPOINT} prints every architecture flag it was trained with"


class SwapError(ValueError):
    """The checkpoint cannot be loaded into this T2R model; the message is one line: what differs, and the fix."""

    def for_checkpoint(self, path: str) -> "SwapError":
        """The same error with the checkpoint's path in place of the ``CHECKPOINT`` placeholder."""
        return type(self)(str(self).replace(CHECKPOINT, str(path)))


@dataclass
class SwapPlan:
    """What a load will do, decided before anything is copied, so that a refusal leaves the model untouched."""

    reused: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)  # weights the model initialises fresh
    dropped: List[str] = field(default_factory=list)  # checkpoint tensors not loaded (only with --reset-feature-maps)
    records: List[str] = field(default_factory=list)  # identity records the checkpoint lacks, taken from the model
    from_softmax: bool = True  # the checkpoint has no linear-attention tensor at all
    reset_note: str = ""  # what --reset-feature-maps replaced
    legacy_note: str = ""  # what is assumed for a checkpoint without identity records

    @property
    def is_swap(self) -> bool:
        """Worth the summary line: new weights, replaced ones, or a softmax checkpoint becoming T2R."""
        return bool(self.new or self.dropped) or (self.from_softmax and bool(self.records))

    @property
    def completes(self) -> List[str]:
        """Model tensors to add to the checkpoint's before the strict load."""
        return self.new + self.records

    def summary(self) -> str:
        """One line: counts, and the new tensors grouped by name pattern (layer indices folded)."""
        source = "softmax" if self.from_softmax else "T2R"
        line = (
            f"T2R swap: reused {len(self.reused)} tensors from the {source} checkpoint; "
            f"new {len(self.new)} tensors{f' ({_groups(self.new)})' if self.new else ''}; dropped {len(self.dropped)}"
        )
        return line + (f" ({self.reset_note})" if self.reset_note else "")


def _groups(names: Iterable[str]) -> str:
    patterns = Counter(_fold(name) for name in names)
    return ", ".join(f"{p} x{n}" for p, n in sorted(patterns.items()))


def _fold(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def _feature_map_module(name: str) -> Optional[str]:
    m = _FEATURE_MAP.match(name)
    return m.group(1) if m else None


def _specs(state: Mapping[str, Tensor]) -> Dict[str, FeatureMapSpec]:
    """``{feature-map module: spec}`` of the identity records in ``state``."""
    suffix = "." + SPEC_BUFFER
    out = {}
    for name, tensor in state.items():
        if name.endswith("feature_map" + suffix):
            try:
                out[name[: -len(suffix)]] = FeatureMapSpec.from_tensor(tensor)
            except ValueError as exc:
                raise SwapError(f"checkpoint tensor '{name}' is not a feature-map identity record ({exc}): "
                                f"the checkpoint is damaged or was edited; re-save it from its model") from None
    return out


def _windows(state: Mapping[str, Tensor]) -> Dict[str, int]:
    """``{attention module: W}`` of the sliding-window layers' ``window_size`` records."""
    suffix = "." + WINDOW_SIZE_BUFFER
    return {name[: -len(suffix)]: int(t.reshape(-1)[0]) for name, t in state.items() if name.endswith(suffix)}


# -- feature maps and windows ----------------------------------------------------------------


def _spec_fix_flags(module: str, ckpt: FeatureMapSpec, own: FeatureMapSpec) -> List[str]:
    """The flags that make this model build ``ckpt``'s map in ``module``."""
    cross = ".encoder_attn." in module + "."
    stack = "encoder" if module.startswith("encoder.") else "decoder"
    flags: List[str] = []
    if (ckpt.num_heads, ckpt.head_dim) != (own.num_heads, own.head_dim):
        if ckpt.num_heads * ckpt.head_dim != own.num_heads * own.head_dim:
            flags += [f"--{stack}-embed-dim", str(ckpt.num_heads * ckpt.head_dim)]
        if ckpt.num_heads != own.num_heads:
            flags += [f"--{stack}-attention-heads", str(ckpt.num_heads)]
    if ckpt.map_id != own.map_id and not ckpt.name.startswith("an unknown"):
        flags += ["--feature-map", ckpt.name]
    if ckpt.feature_size and (ckpt.feature_size != own.feature_size or ckpt.map_id != own.map_id):
        flags += ["--cross-feature-size" if cross else "--feature-size", str(ckpt.feature_size)]
    return flags


def feature_map_mismatch_message(mismatches: List[Tuple[str, FeatureMapSpec, FeatureMapSpec]]) -> str:
    """One line for checkpoint feature maps that differ from the model's: both sides, where, and the fix."""
    module, ckpt, own = mismatches[0]
    same_shapes = (ckpt.num_heads, ckpt.head_dim) == (own.num_heads, own.head_dim)
    where = Counter(_fold(m) for m, _, _ in mismatches)
    places = ", ".join(f"{p} x{n}" for p, n in sorted(where.items()))
    flags: List[str] = []
    for m, c, o in mismatches:  # each flag once, from the first layer that needs it
        wanted = _spec_fix_flags(m, c, o)
        for flag, value in zip(wanted[::2], wanted[1::2]):
            if flag not in flags[::2]:
                flags += [flag, value]
    fix = (f"build it with {' '.join(flags)}" if flags
           else f"build it with the flags that python -m t2r_fairseq.tools.arch_flags {CHECKPOINT} prints")
    message = (
        f"checkpoint feature maps are {ckpt.describe(shapes=not same_shapes)} but this model builds "
        f"{own.describe(shapes=not same_shapes)} ({places}): {fix}"
    )
    if same_shapes:
        message += (f", or pass --reset-feature-maps to start new {own.name} maps from the checkpoint's other "
                    "weights")
    return message


def _window_message(module: str, ckpt_w: Optional[int], own_w: Optional[int]) -> str:
    if own_w is None:
        trained = f" (--sliding-window {ckpt_w})" if ckpt_w else ""
        return (
            f"checkpoint tensor '{module}.window_logit' is the window factor of a sliding-window hybrid{trained}, but "
            f"this model has no window: build it with --sliding-window {ckpt_w if ckpt_w else 'W'} "
            f"(the W the checkpoint was trained with{'' if ckpt_w else '; ' + ARCH_FLAGS_HINT})"
        )
    return (
        f"checkpoint was trained with --sliding-window {ckpt_w} but this model builds --sliding-window {own_w} "
        f"({_fold(module)}): build it with --sliding-window {ckpt_w} (its window factors were trained for that window)"
    )


def partial_swap_message(absent: List[str]) -> str:
    """One line for a T2R checkpoint without feature maps for the attention modules ``absent`` of this model.

    Such a checkpoint is not a softmax teacher: the layers it has maps for were
    finetuned as linear attention, the others as softmax, so fresh maps there
    would silently change a trained model. The usual cause is a translation
    checkpoint trained with ``--softmax-cross-attention`` (or without
    ``--swap-encoder``) loaded into a model built without (with) it.
    """
    cross = [m for m in absent if m.endswith(".encoder_attn.feature_map")]
    encoder = [m for m in absent if m.startswith("encoder.")]
    places = _groups(m[: -len(".feature_map")] for m in absent)
    fix = "--reset-feature-maps to start new feature maps there on purpose"
    if absent == cross:
        return (f"the checkpoint is a T2R checkpoint whose decoder cross-attention stayed softmax (trained with "
                f"--softmax-cross-attention: no feature maps for {places}) but this model's cross-attention is "
                f"linear: build it with --softmax-cross-attention, or pass {fix}")
    if absent == encoder:
        return (f"the checkpoint is a T2R checkpoint whose encoder self-attention stayed softmax (trained without "
                f"--swap-encoder: no feature maps for {places}) but this model's encoder is linear: build it without "
                f"--swap-encoder, or pass {fix}")
    if sorted(absent) == sorted(cross + encoder):
        return (f"the checkpoint is a T2R checkpoint whose encoder self-attention and decoder cross-attention stayed "
                f"softmax (no feature maps for {places}) but this model's are linear: build it with "
                f"--softmax-cross-attention and without --swap-encoder, or pass {fix}")
    return (f"the checkpoint is a T2R checkpoint (it has linear-attention tensors) but has no feature maps for "
            f"{places}, so it is not a softmax teacher to swap: build this model with the flags the checkpoint was "
            f"trained with (python -m t2r_fairseq.tools.arch_flags {CHECKPOINT} prints them), or pass {fix}")


# -- diagnosis -------------------------------------------------------------------------------


def _layer_counts(state: Mapping[str, Tensor]) -> Dict[str, int]:
    layers: Dict[str, set] = {}
    for name in state:
        m = _LAYER.match(name)
        if m:
            layers.setdefault(m.group(1), set()).add(int(m.group(2)))
    return {stack: max(idx) + 1 for stack, idx in layers.items()}


def _shape(state: Mapping[str, Tensor], name: str) -> Optional[Tuple[int, ...]]:
    return tuple(state[name].shape) if name in state else None


# Keys whose presence on one side only is explained by a flag (pattern, what it is, flag to check).
_KEY_HINTS = (
    (re.compile(r"(^|\.)(bias_k|bias_v)$"), "extra key/value slots", "add_bias_kv (T2R has no such slots)"),
    (re.compile(r"(^|\.)embed_positions\."), "learned positional embeddings", "--{stack}-learned-pos"),
    (re.compile(r"(^|\.)output_projection\."), "a separate output projection",
     "--share-decoder-input-output-embed / --share-all-embeddings"),
    (re.compile(r"^(encoder|decoder)\.layer_norm\."), "a final layer norm",
     "--{stack}-normalize-before / --no-decoder-final-norm"),
    (re.compile(r"(^|\.)layernorm_embedding\."), "an embedding layer norm", "--layernorm-embedding"),
    (re.compile(r"(^|\.)adaptive_softmax\."), "an adaptive softmax", "--adaptive-softmax-cutoff"),
    (re.compile(r"(^|\.)embed_tokens\.(embeddings|weight_\d)"), "adaptive input", "--adaptive-input"),
)
# Linear attention in the checkpoint where this model keeps softmax (the other way round is a swap).
_LINEAR_ONLY_IN_CHECKPOINT = (
    (re.compile(r"^encoder\.layers\.\d+\.self_attn\.feature_map\."),
     "the checkpoint's encoder self-attention is linear but this model's is softmax: build it with --swap-encoder"),
    (re.compile(r"\.encoder_attn\.feature_map\."),
     "the checkpoint's cross-attention is linear but this model keeps it softmax: build it without "
     "--softmax-cross-attention"),
)


def _key_hint(name: str, checkpoint_has_it: bool) -> Optional[str]:
    """What a tensor present on one side only says about the flags the two models were built with."""
    if checkpoint_has_it:
        for pattern, message in _LINEAR_ONLY_IN_CHECKPOINT:
            if pattern.search(name):
                return f"{message} ('{name}')"
    for pattern, what, flag in _KEY_HINTS:
        if pattern.search(name):
            stack = "encoder" if name.startswith("encoder.") else "decoder"
            side = "the checkpoint has" if checkpoint_has_it else "this model has"
            other = "this model has not" if checkpoint_has_it else "the checkpoint has not"
            return f"{side} {what} ('{name}') and {other}: check {flag.format(stack=stack)}"
    return None


def diagnose(
    model_state: Mapping[str, Tensor],
    checkpoint_state: Mapping[str, Tensor],
    evidence: str = "",
) -> str:
    """One line saying why ``checkpoint_state`` does not fit ``model_state`` and which flag to change.

    Compares what the names and shapes reveal of each architecture -- layers per
    stack, vocabulary (``embed_tokens`` rows), embedding and FFN dims, tensors
    present on one side only -- and falls back on ``evidence`` (the first tensor
    that did not fit) plus the ``arch_flags`` tool that prints a checkpoint's flags.
    """
    mine, theirs = _layer_counts(model_state), _layer_counts(checkpoint_state)
    prefix = f"{evidence}: " if evidence else ""
    if set(mine) != set(theirs) and theirs:
        kind = {frozenset({"decoder"}): "a language model (no encoder)", frozenset({"encoder", "decoder"}):
                "an encoder-decoder model"}
        ckpt_kind = kind.get(frozenset(theirs), f"a model with stacks {sorted(theirs)}")
        own_kind = kind.get(frozenset(mine), f"a model with stacks {sorted(mine)}")
        arch = "t2r_transformer_lm" if set(theirs) == {"decoder"} else "t2r_transformer"
        return (f"{prefix}the checkpoint is {ckpt_kind} but this model is {own_kind}: build it with --arch {arch} "
                f"and the task it was trained with ({ARCH_FLAGS_HINT})")
    causes: List[str] = []
    flags: List[str] = []
    for stack in ("encoder", "decoder"):
        if stack in mine and stack in theirs and mine[stack] != theirs[stack]:
            causes.append(f"{theirs[stack]} {stack} layers (this model {mine[stack]})")
            flags += [f"--{stack}-layers", str(theirs[stack])]
        fc1 = f"{stack}.layers.0.fc1.weight"
        a, b = _shape(checkpoint_state, fc1), _shape(model_state, fc1)
        if a and b and len(a) == len(b) == 2:
            if a[1] != b[1]:
                causes.append(f"{stack} embedding dim {a[1]} (this model {b[1]})")
                flags += [f"--{stack}-embed-dim", str(a[1])]
            if a[0] != b[0]:
                causes.append(f"{stack} FFN dim {a[0]} (this model {b[0]})")
                flags += [f"--{stack}-ffn-embed-dim", str(a[0])]
    if causes:
        return (f"{prefix}the checkpoint has {', '.join(causes)}: build it with {' '.join(flags)} "
                f"({ARCH_FLAGS_HINT})")
    for name in sorted(checkpoint_state):
        if not re.search(r"(^|\.)(embed_tokens|output_projection)\.weight$", name):
            continue
        a, b = _shape(checkpoint_state, name), _shape(model_state, name)
        if a and b and len(a) == len(b) == 2 and a[0] != b[0] and a[1] == b[1]:
            side = ("source " if name.startswith("encoder.") else "target ") if "encoder" in mine else ""
            return (f"{prefix}the checkpoint's {side}dictionary has {a[0]} entries but this model's has {b[0]} "
                    f"('{name}'): use the data directory (dict*.txt) the checkpoint was trained with")
    unexpected = [n for n in checkpoint_state if n not in model_state]
    # Missing linear-attention tensors are the swap's new ones, unless the checkpoint has that feature map.
    present = {_feature_map_module(k) for k in checkpoint_state} - {None}
    missing = [
        n for n in model_state
        if n not in checkpoint_state and not RECORD_PATTERN.search(n)
        and (not NEW_TENSOR_PATTERN.search(n) or _feature_map_module(n) in present)
    ]
    for names, has in ((unexpected, True), (missing, False)):
        for name in names:
            hint = _key_hint(name, has)
            if hint:
                return f"{prefix}{hint} ({ARCH_FLAGS_HINT})"
    reshaped = [n for n, t in checkpoint_state.items() if n in model_state and t.shape != model_state[n].shape]
    fm = [n for n in reshaped + unexpected + missing if _feature_map_module(n)]
    if fm:
        own = _specs(model_state)
        module = _feature_map_module(fm[0])
        built = f"{own[module].describe()} maps" if module in own else "maps"
        return (f"{prefix}the checkpoint's feature-map tensors (first '{fm[0]}') do not fit this model's {built}: build "
                f"it with the --feature-map/--feature-size it was trained with ({ARCH_FLAGS_HINT})")
    if not evidence and unexpected:
        evidence = (f"the checkpoint has {len(unexpected)} tensor(s) this model has no place for, first "
                    f"'{unexpected[0]}'; refusing to drop weights silently")
    elif not evidence and missing:
        evidence = f"the checkpoint lacks {len(missing)} tensor(s) this model needs, first '{missing[0]}'"
    return f"{evidence}: the checkpoint must come from a model of the same architecture ({ARCH_FLAGS_HINT})"


# -- the plan --------------------------------------------------------------------------------


def plan_swap(
    model_state: Mapping[str, Tensor], checkpoint_state: Mapping[str, Tensor], reset_feature_maps: bool = False
) -> SwapPlan:
    """Decide how ``checkpoint_state`` maps onto ``model_state``; raise :class:`SwapError` if it cannot.

    ``reset_feature_maps``: where the checkpoint's feature maps differ from the
    model's (or carry no identity record), drop them and keep the model's fresh
    ones instead of refusing. Maps that match load as usual, so the flag is
    harmless when a run that used it is resumed or evaluated.
    """
    plan = SwapPlan(from_softmax=not any(NEW_TENSOR_PATTERN.search(k) for k in checkpoint_state))
    checkpoint_state = dict(checkpoint_state)

    # 1. Feature maps: same kind, size and heads, or an explicit reset.
    own_specs, ckpt_specs = _specs(model_state), _specs(checkpoint_state)
    present = {_feature_map_module(k) for k in checkpoint_state} - {None}
    mismatches = [(m, ckpt_specs[m], s) for m, s in own_specs.items() if m in ckpt_specs and ckpt_specs[m] != s]
    legacy = sorted(m for m in own_specs if m in present and m not in ckpt_specs)
    reshaped = [(m, c, o) for m, c, o in mismatches if (c.num_heads, c.head_dim) != (o.num_heads, o.head_dim)]
    if reshaped or (mismatches and not reset_feature_maps):  # other heads: the architecture, not the maps, differs
        raise SwapError(feature_map_mismatch_message(reshaped or mismatches))
    reset = [m for m, _, _ in mismatches] + (legacy if reset_feature_maps else [])
    if reset:
        old = " / ".join(sorted({ckpt_specs[m].describe() for m in reset if m in ckpt_specs}))
        new = " / ".join(sorted({own_specs[m].describe() for m in reset}))
        for name in [k for k in checkpoint_state if _feature_map_module(k) in reset]:
            del checkpoint_state[name]
            if not RECORD_PATTERN.search(name):
                plan.dropped.append(name)
        plan.reset_note = (f"--reset-feature-maps: new {new} feature maps in {len(reset)} attention layers replace "
                           f"the checkpoint's {old + ' ones' if old else 'unrecorded ones (saved by an older t2r-fairseq)'}")
        legacy = [m for m in legacy if m not in reset]

    # 2. Sliding windows: the window factors were trained for one W.
    own_w, ckpt_w = _windows(model_state), _windows(checkpoint_state)
    for module, w in ckpt_w.items():
        if own_w.get(module) != w:
            raise SwapError(_window_message(module, w, own_w.get(module)))
    unrecorded_windows = []
    for name in checkpoint_state:
        if name.endswith(".window_logit"):
            module = name[: -len(".window_logit")]
            if module not in own_w:
                raise SwapError(_window_message(module, ckpt_w.get(module), None))
            if module not in ckpt_w:
                unrecorded_windows.append(module)
    if legacy or unrecorded_windows:
        assumed = []
        if legacy:
            assumed.append(f"its feature maps are {' / '.join(sorted({own_specs[m].describe() for m in legacy}))}")
        if unrecorded_windows:
            assumed.append(f"its window is --sliding-window {sorted({own_w[m] for m in unrecorded_windows})[0]}")
        plan.legacy_note = (
            f"T2R load: the checkpoint has no identity records (saved by an older t2r-fairseq); assuming "
            f"{' and '.join(assumed)}, as this model builds them; if it was trained otherwise, rebuild the model "
            f"with the flags python -m t2r_fairseq.tools.arch_flags prints for it (or pass --reset-feature-maps)"
        )

    # 3. Every other tensor: same name, same shape.
    evidence = ""
    unexpected: List[str] = []
    for name, tensor in checkpoint_state.items():
        if name not in model_state:
            unexpected.append(name)
            continue
        own = model_state[name]
        if tuple(own.shape) != tuple(tensor.shape):
            evidence = evidence or (
                f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)} but the T2R model expects "
                f"{tuple(own.shape)}"
            )
            continue
        plan.reused.append(name)
    plan.reused = [n for n in plan.reused if not RECORD_PATTERN.search(n)]
    missing = [name for name in model_state if name not in checkpoint_state]
    loaded_maps = present - set(reset)
    bad_missing = [
        n for n in missing
        if not NEW_TENSOR_PATTERN.search(n) or (_feature_map_module(n) in loaded_maps and not RECORD_PATTERN.search(n))
    ]
    if evidence or unexpected or bad_missing:
        raise SwapError(diagnose(model_state, checkpoint_state, evidence))

    # 4. A T2R checkpoint is not a teacher: maps it lacks are started fresh only on request.
    absent = sorted({_feature_map_module(n) for n in missing} - {None} - set(reset) - present)
    if absent and not plan.from_softmax:
        if not reset_feature_maps:
            raise SwapError(partial_swap_message(absent))
        note = (f"--reset-feature-maps: new feature maps in {len(absent)} attention layers the T2R checkpoint has "
                f"none for ({_groups(m[: -len('.feature_map')] for m in absent)})")
        plan.reset_note = f"{plan.reset_note}; {note}" if plan.reset_note else note
    for name in missing:
        (plan.records if RECORD_PATTERN.search(name) else plan.new).append(name)
    return plan


def complete_with_new_tensors(
    model_state: Mapping[str, Tensor], checkpoint_state: Mapping[str, Tensor], plan: SwapPlan
) -> Dict[str, Tensor]:
    """A state dict with the checkpoint's tensors (less those the plan drops) plus the model's own new ones."""
    dropped = set(plan.dropped)
    merged = {k: v for k, v in checkpoint_state.items() if k not in dropped}
    for name in plan.completes:
        merged[name] = model_state[name]
    return merged


def reset_feature_maps_option(model_cfg: Any = None, args: Any = None) -> bool:
    """``--reset-feature-maps`` of the run doing the load (False when the config does not say)."""
    for cfg in (model_cfg, args):
        if cfg is not None and safe_getattr(cfg, "reset_feature_maps", None) is not None:
            return bool(safe_getattr(cfg, "reset_feature_maps", False))
    return False


class SwapLoadMixin:
    """Mix into a fairseq model before the fairseq base class to make loading swap-aware."""

    def load_state_dict(
        self, state_dict: Dict[str, Tensor], strict: bool = True, model_cfg: Optional[Any] = None, args: Optional[Any] = None
    ) -> Any:
        if strict:
            # Upgrade first (idempotent; fairseq repeats it) so old key names compare equal.
            self.upgrade_state_dict(state_dict)  # type: ignore[attr-defined]
            own = self.state_dict()  # type: ignore[attr-defined]
            plan = plan_swap(own, state_dict, reset_feature_maps_option(model_cfg, args))
            if plan.legacy_note:
                logger.warning(plan.legacy_note)
            if plan.completes or plan.dropped:
                state_dict = complete_with_new_tensors(own, state_dict, plan)
            if plan.is_swap:
                logger.info(plan.summary())
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)  # type: ignore[misc]
