"""Feature maps ``phi`` for kernelised attention, behind a small registry.

A feature map is a tiny ``nn.Module`` applied per head to queries and keys in
the head-first layout ``[B, H, L, head_dim] -> [B, H, L, output_dim]``. It is
told whether it sees queries or keys because some maps (Performer) treat them
differently; queries arrive already scaled by ``head_dim ** -0.5`` exactly as
fairseq's softmax attention scales them, so a swapped model sees the same
inputs its teacher did.

Adding a map is one class plus one ``@register_feature_map("name")`` line.
Random projections are registered *buffers*: they are saved in checkpoints,
so a reloaded model computes the same function (redrawing them would silently
change a trained model).

Identity record. Maps of the same shapes can mean different functions (T2R's
and Hedgehog's ``weight``/``bias`` are both ``[H, k, d]``/``[H, k]``; RFA's and
Performer's projections coincide), so shapes alone cannot tell a checkpoint's
maps apart. Every map therefore carries a persistent integer buffer ``spec``
(:func:`feature_map_spec`: format version, a stable id of the map's name,
feature size, heads, head dim), saved with the weights; the loader
(:mod:`t2r_fairseq.conversion.swap`) compares it with the model's before reinterpreting
anything. It is an integer tensor so ``model.half()`` / ``--fp16`` leave it
alone and fairseq's ``scripts/average_checkpoints.py`` (which integer-divides
non-float tensors) keeps it exact.

Learning-rate scale. After a swap the maps are the only parameters that start
from scratch; ``lr_scale = s`` (``--feature-map-lr-scale``) asks for their
optimizer step to be ``s`` times the one the optimizer computes. The map only
records ``s``; :mod:`t2r_fairseq.models.step_scale` applies it to the optimizer
fairseq builds, exactly for every optimizer and schedule. Parameters are always
stored as their effective values, so a checkpoint means the same function
whatever ``s`` it is loaded with (``s`` is a training choice, not part of the
model).
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Dict, NamedTuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_MAPS: Dict[str, Type["FeatureMap"]] = {}
# The learned T2R map with its own layer for the keys (``t2r_qk``): the same state and per-step cost as the paper's
# tied ``t2r``, and lower dev loss on docs/RESULTS.md's study (MT: on every seed, with a closer fit to the teacher's
# attention at the swap; LM: on the mean of three seeds, test perplexity lower on every seed). ``--feature-map t2r``
# is the paper's map. Defined here so that the model options and a layer built directly
# (``LinearAttentionOptions()``) agree.
# Checkpoints store the map they were built with, so changing this default never reinterprets one.
DEFAULT_FEATURE_MAP = "t2r_qk"

# Version of the ``spec`` buffer's layout (bump when its fields change; readers accept older versions).
SPEC_VERSION = 1
SPEC_BUFFER = "spec"


def feature_map_id(name: str) -> int:
    """A stable number for a map's name (CRC-32): the same in every process and release, no table to maintain."""
    return zlib.crc32(name.encode("utf-8"))


class FeatureMapSpec(NamedTuple):
    """What a feature map's tensors mean; stored as the ``spec`` buffer ``[version, id, size, heads, head_dim]``."""

    map_id: int
    feature_size: int  # 0 for maps that ignore --feature-size (elu)
    num_heads: int
    head_dim: int

    @property
    def name(self) -> str:
        """The registered name of the map, or a placeholder for a map this installation does not know."""
        for name in FEATURE_MAPS:
            if feature_map_id(name) == self.map_id:
                return name
        return f"an unknown feature map (id {self.map_id})"

    def describe(self, shapes: bool = False) -> str:
        """``t2r (k=32)``; with ``shapes`` also the heads, e.g. ``t2r (k=32, 4 heads of dim 8)``."""
        parts = [f"k={self.feature_size}"] if self.feature_size else []
        if shapes:
            parts.append(f"{self.num_heads} heads of dim {self.head_dim}")
        return f"{self.name} ({', '.join(parts)})" if parts else self.name

    def to_tensor(self) -> Tensor:
        return torch.tensor([SPEC_VERSION, self.map_id, self.feature_size, self.num_heads, self.head_dim],
                            dtype=torch.long)

    @classmethod
    def from_tensor(cls, spec: Tensor) -> "FeatureMapSpec":
        values = [int(v) for v in spec.reshape(-1).tolist()]
        if len(values) < 5 or values[0] < 1:
            raise ValueError(f"not a feature-map spec: {values}")
        return cls(*values[1:5])


def feature_map_spec(name: str, num_heads: int, head_dim: int, feature_size: int) -> FeatureMapSpec:
    """The identity record of map ``name`` built with these sizes."""
    uses_size = FEATURE_MAPS[name].uses_feature_size if name in FEATURE_MAPS else True
    return FeatureMapSpec(feature_map_id(name), feature_size if uses_size else 0, num_heads, head_dim)


def register_feature_map(name: str) -> Callable[[Type["FeatureMap"]], Type["FeatureMap"]]:
    """Class decorator: make a feature map available as ``--feature-map name``."""

    def wrapper(cls: Type["FeatureMap"]) -> Type["FeatureMap"]:
        if name in FEATURE_MAPS:
            raise ValueError(f"feature map {name!r} is already registered ({FEATURE_MAPS[name].__name__})")
        clash = [other for other in FEATURE_MAPS if feature_map_id(other) == feature_map_id(name)]
        if clash:  # would make two maps' checkpoints indistinguishable
            raise ValueError(f"feature map {name!r} has the same id as {clash[0]!r}; choose another name")
        FEATURE_MAPS[name] = cls
        cls.name = name
        return cls

    return wrapper


def build_feature_map(
    name: str, num_heads: int, head_dim: int, feature_size: int, lr_scale: float = 1.0
) -> "FeatureMap":
    """Instantiate a registered map; an unknown name lists the valid ones."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; valid feature maps: {', '.join(sorted(FEATURE_MAPS))}")
    if feature_size < 1 and FEATURE_MAPS[name].uses_feature_size:
        raise ValueError(f"feature size must be >= 1 for feature map {name!r}, got {feature_size}")
    if not (lr_scale > 0 and math.isfinite(lr_scale)):
        raise ValueError(f"--feature-map-lr-scale must be a finite number > 0, got {lr_scale}")
    fmap = FEATURE_MAPS[name](num_heads, head_dim, feature_size)
    fmap.set_lr_scale(lr_scale)
    return fmap


class FeatureMap(nn.Module):
    """Base class. Subclasses set ``output_dim`` and implement :meth:`forward`."""

    name: str = ""
    uses_feature_size: bool = True

    def __init__(self, num_heads: int, head_dim: int, feature_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.feature_size = feature_size
        self.output_dim = feature_size
        self.lr_scale = 1.0
        # Persistent identity record (see the module docstring); integer, so dtype casts leave it alone.
        self.register_buffer(SPEC_BUFFER, feature_map_spec(self.name, num_heads, head_dim, feature_size).to_tensor())

    def forward(self, x: Tensor, is_query: bool) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- learning-rate scale (see the module docstring) ------------------------

    def set_lr_scale(self, lr_scale: float) -> None:
        """Record the step multiplier for :mod:`t2r_fairseq.models.step_scale`; the stored weights do not change."""
        self.lr_scale = float(lr_scale)

    def affine_prefix(self, is_query: bool = True) -> tuple[Tensor, Tensor | None] | None:
        """``(weight [H, k, d], bias [H, k] | None)`` when the map starts with a per-head affine layer.

        Such a layer composes with the attention's own q/k projection into one
        matrix, so at generation the projection and the layer become a single
        matmul (see ``LinearMultiheadAttention``); maps without one return ``None``.
        ``is_query`` picks the side for maps whose queries and keys have their own
        layer (``t2r_qk``); the others return the same prefix for both. A map that
        returns a prefix must satisfy
        ``forward(x, q) == activate(per_head_linear(x, *affine_prefix(q)), q)``.
        """
        return None

    def activate(self, u: Tensor, is_query: bool) -> Tensor:
        """The rest of the map after :meth:`affine_prefix` (the whole map when there is none)."""
        return self(u, is_query)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, output_dim={self.output_dim}"


def per_head_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x: [B, H, L, d]``, ``weight: [H, k, d]`` -> ``[B, H, L, k]`` (one Linear per head).

    Two layouts, picked by which one copies less. ``matmul`` broadcasting over
    the batch materialises the weight once per sequence (``B x H x k x d``),
    negligible for long sequences but the dominant cost of a batched decode step
    (L = 1): there the heads become the bmm batch instead, which copies only
    ``x`` (``B x H x L x d``) and reads each weight once (18x faster at B=16).
    """
    weight = weight.to(x.dtype)
    B, H, L, d = x.shape
    if B > 1 and L < weight.size(1):
        rows = x.transpose(0, 1).reshape(H, B * L, d)
        if bias is None:
            y = torch.bmm(rows, weight.transpose(-1, -2))
        else:
            y = torch.baddbmm(bias.to(x.dtype).unsqueeze(1), rows, weight.transpose(-1, -2))
        return y.view(H, B, L, -1).transpose(0, 1)
    y = torch.matmul(x, weight.transpose(-1, -2))
    if bias is not None:
        y = y + bias.to(x.dtype).unsqueeze(-2)
    return y


def _linear_init_(weight: Tensor, bias: Tensor | None) -> None:
    """``nn.Linear``'s default init, per head: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(weight.size(-1))
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


@register_feature_map("t2r")
class T2RFeatureMap(FeatureMap):
    """T2R (Kasai et al. 2021): ``phi_h(u) = ReLU(W_h u + b_h)``, one MLP per head.

    The same map serves queries and keys of a head; initialised like
    ``nn.Linear`` as in the original code, then learned during finetuning.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_size: int) -> None:
        super().__init__(num_heads, head_dim, feature_size)
        self.weight = nn.Parameter(torch.empty(num_heads, feature_size, head_dim))
        self.bias = nn.Parameter(torch.empty(num_heads, feature_size))
        _linear_init_(self.weight, self.bias)

    def forward(self, x: Tensor, is_query: bool) -> Tensor:
        return self.activate(per_head_linear(x, *self.affine_prefix(is_query)), is_query)

    def affine_prefix(self, is_query: bool = True) -> tuple[Tensor, Tensor | None]:
        return self.weight, self.bias

    def activate(self, u: Tensor, is_query: bool) -> Tensor:
        return F.relu(u)


@register_feature_map("t2r_qk")
class T2RQKFeatureMap(T2RFeatureMap):
    """T2R with its own layer for the keys: ``phi(q) = ReLU(W q + b)``, ``phi(k) = ReLU(W' k + b')``.

    The paper ties queries and keys to one MLP per head. Untying them costs
    nothing where it matters: the key side runs once per key (once per source for
    cross-attention), the query side is the same size as T2R's, each folds into
    its own projection at generation, and the state ``(S, z)`` is unchanged. It
    gives the fit to a teacher twice the parameters, which is the point at the
    swap: calibration trains *only* the maps while the pretrained q/k projections
    stay fixed, and a tied map has to serve two different input spaces (decoder
    states and encoder outputs for cross-attention). On the Multi30k teacher the
    calibrated KL to the teacher's cross-attention fell from 0.09-0.22 (tied, 128
    features) to 0.07-0.13 per layer (docs/RESULTS.md). The key layer starts as a
    copy of the query layer, so an untrained ``t2r_qk`` computes exactly what
    ``t2r`` does with the same seed.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_size: int) -> None:
        super().__init__(num_heads, head_dim, feature_size)
        self.key_weight = nn.Parameter(self.weight.detach().clone())
        self.key_bias = nn.Parameter(self.bias.detach().clone())

    def affine_prefix(self, is_query: bool = True) -> tuple[Tensor, Tensor | None]:
        if is_query:
            return super().affine_prefix(is_query)
        return self.key_weight, self.key_bias


@register_feature_map("elu")
class EluFeatureMap(FeatureMap):
    """ELU+1 (Katharopoulos et al. 2020): parameter-free, output size = head dim."""

    uses_feature_size = False

    def __init__(self, num_heads: int, head_dim: int, feature_size: int) -> None:
        super().__init__(num_heads, head_dim, feature_size)
        self.output_dim = head_dim

    def forward(self, x: Tensor, is_query: bool) -> Tensor:
        return F.elu(x) + 1.0


@register_feature_map("rfa")
class RandomFourierFeatureMap(FeatureMap):
    """RFA (Peng et al. 2021): ``[sin(W x), cos(W x)] / sqrt(k)`` on unit-norm ``x``.

    ``W ~ N(0, I)`` is a fixed buffer per head; the inverse temperature
    ``1 / sigma_h`` is learned per head (initialised to 1), as in RFA where the
    kernel width is a parameter. Output size is ``2 * feature_size``.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_size: int) -> None:
        super().__init__(num_heads, head_dim, feature_size)
        self.output_dim = 2 * feature_size
        self.register_buffer("projection", torch.randn(num_heads, feature_size, head_dim))
        self.inv_sigma = nn.Parameter(torch.ones(num_heads))

    def forward(self, x: Tensor, is_query: bool) -> Tensor:
        x = F.normalize(x, dim=-1) * self.inv_sigma.to(x.dtype).view(-1, 1, 1)
        wx = per_head_linear(x, self.projection)
        return torch.cat([torch.sin(wx), torch.cos(wx)], dim=-1) * self.feature_size**-0.5


def orthogonal_gaussian_projection(rows: int, cols: int, generator: torch.Generator | None = None) -> Tensor:
    """Rows drawn as stacked orthogonal blocks, each row rescaled to a Gaussian norm.

    This is FAVOR+'s estimator: orthogonality lowers the variance of the
    softmax-kernel estimate while keeping each row marginally ``N(0, I)``.
    """
    blocks = []
    for _ in range(-(-rows // cols)):
        q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator))
        blocks.append(q.T)
    w = torch.cat(blocks, dim=0)[:rows]
    norms = torch.randn(rows, cols, generator=generator).norm(dim=1, keepdim=True)
    return w * norms


@register_feature_map("performer")
class PerformerFeatureMap(FeatureMap):
    """Performer FAVOR+ (Choromanski et al. 2021): positive orthogonal random features.

    ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(k)`` estimates ``exp(q . k)``. Both
    sides are put on the symmetric ``head_dim ** -1/4`` scale so that
    ``phi(q) . phi(k) ~ exp(q . k / sqrt(d))``, fairseq's softmax kernel. Queries
    are stabilised by subtracting their own max exponent (a per-query constant
    cancels in the ratio); keys are not, since a key's scale must be the same
    whichever prefix it is summed into (recurrent == parallel).
    """

    def __init__(self, num_heads: int, head_dim: int, feature_size: int) -> None:
        super().__init__(num_heads, head_dim, feature_size)
        proj = torch.stack([orthogonal_gaussian_projection(feature_size, head_dim) for _ in range(num_heads)])
        self.register_buffer("projection", proj)

    def forward(self, x: Tensor, is_query: bool) -> Tensor:
        # Queries come scaled by d^-1/2; bring both sides to d^-1/4.
        x = x.float() * (self.head_dim**0.25 if is_query else self.head_dim**-0.25)
        wx = per_head_linear(x, self.projection) - 0.5 * x.pow(2).sum(dim=-1, keepdim=True)
        if is_query:
            wx = wx - wx.amax(dim=-1, keepdim=True).detach()
        return torch.exp(wx) * self.feature_size**-0.5


@register_feature_map("hedgehog")
class HedgehogFeatureMap(FeatureMap):
    """Hedgehog (Zhang et al. 2024): ``[softmax(W u + b), softmax(-(W u + b))]``.

    A learned map whose dot products are spiky and monotone like softmax
    attention's; output size is ``2 * feature_size``. ``W`` starts as the
    (rectangular) identity, so the map initially looks at the raw head
    dimensions, as in the Hedgehog code.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_size: int) -> None:
        super().__init__(num_heads, head_dim, feature_size)
        self.output_dim = 2 * feature_size
        self.weight = nn.Parameter(torch.eye(feature_size, head_dim).repeat(num_heads, 1, 1))
        self.bias = nn.Parameter(torch.zeros(num_heads, feature_size))

    def forward(self, x: Tensor, is_query: bool) -> Tensor:
        return self.activate(per_head_linear(x, *self.affine_prefix(is_query)), is_query)

    def affine_prefix(self, is_query: bool = True) -> tuple[Tensor, Tensor | None]:
        return self.weight, self.bias

    def activate(self, u: Tensor, is_query: bool) -> Tensor:
        return torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1)
