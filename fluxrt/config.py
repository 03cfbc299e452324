"""FluxConfig: the hyper-parameters of a FLUX.1 transformer (BFL's FluxParams, validated)."""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fluxrt")

# FluxTransformer2DModel.__init__'s arguments and defaults (diffusers 0.30-0.42): a config.json that leaves a field
# out gets diffusers' default, as diffusers itself would build it.
_DIFFUSERS_DEFAULTS = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
_DIFFUSERS_CLASS = "FluxTransformer2DModel"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: tuple[int, ...]
    theta: int
    qkv_bias: bool
    guidance_embed: bool

    def __post_init__(self) -> None:
        if not isinstance(self.axes_dim, (tuple, list)) or not all(_is_int(a) for a in self.axes_dim):
            raise ValueError(f"FluxConfig.axes_dim must be a tuple of ints, got {self.axes_dim!r}")
        # Frozen + hashable: store axes_dim as a tuple even when given a list.
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        positive = ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads", "theta")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"FluxConfig.{name} must be a positive int, got {value!r}")
        for name in ("depth", "depth_single_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"FluxConfig.{name} must be an int >= 0, got {value!r}")
        ratio = self.mlp_ratio
        if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool) or not (math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"FluxConfig.mlp_ratio must be a finite number > 0, got {ratio!r}")
        for name in ("qkv_bias", "guidance_embed"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FluxConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"FluxConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if not self.axes_dim or any(a <= 0 or a % 2 for a in self.axes_dim):
            raise ValueError(f"FluxConfig.axes_dim must be positive even ints (RoPE rotates pairs), got {self.axes_dim}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"FluxConfig.axes_dim {list(self.axes_dim)} sums to {sum(self.axes_dim)}, but it must sum to "
                f"head_dim = hidden_size / num_heads = {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def preset(cls, name: str) -> "FluxConfig":
        """"flux-dev", "flux-schnell" (the released models) or "tiny" (a small random-weight config for tests)."""
        try:
            return _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown FluxConfig preset {name!r}; choose one of {sorted(_PRESETS)}") from None

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "FluxConfig":
        """From a diffusers FluxTransformer2DModel config (config.json as a dict, or a model's .config).

        Fields left out take diffusers' defaults; fields fluxrt does not know are ignored with a warning. A field
        of the wrong type or value raises ValueError naming it (patch_size must be 1; mlp_ratio is fixed at 4)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"a diffusers {_DIFFUSERS_CLASS} config must be a JSON object of fields, got a "
                             f"{type(config).__name__}")
        class_name = config.get("_class_name", _DIFFUSERS_CLASS)
        if class_name != _DIFFUSERS_CLASS:
            raise ValueError(f"_class_name is {class_name!r}: this config describes another model, not a "
                             f"{_DIFFUSERS_CLASS}")
        unknown = sorted(k for k in config if not str(k).startswith("_") and k not in _DIFFUSERS_DEFAULTS)
        if unknown:
            log.warning("FluxConfig.from_diffusers: ignoring config fields fluxrt does not know: %s", unknown)
        c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}
        _check_diffusers_fields(c)
        return cls(
            in_channels=c["in_channels"],
            out_channels=c["out_channels"] or c["in_channels"],
            vec_in_dim=c["pooled_projection_dim"],
            context_in_dim=c["joint_attention_dim"],
            hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
            mlp_ratio=4.0,
            num_heads=c["num_attention_heads"],
            depth=c["num_layers"],
            depth_single_blocks=c["num_single_layers"],
            axes_dim=tuple(c["axes_dims_rope"]),
            theta=10000,
            qkv_bias=True,
            guidance_embed=c["guidance_embeds"],
        )

    def to_diffusers(self) -> dict[str, Any]:
        """Keyword arguments for diffusers' FluxTransformer2DModel (which fixes mlp_ratio 4, theta 1e4, qkv bias)."""
        if self.mlp_ratio != 4.0 or self.theta != 10000 or not self.qkv_bias:
            raise ValueError("diffusers' FluxTransformer2DModel supports only mlp_ratio 4.0, theta 10000, qkv_bias True")
        return dict(
            patch_size=1,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_layers=self.depth,
            num_single_layers=self.depth_single_blocks,
            attention_head_dim=self.head_dim,
            num_attention_heads=self.num_heads,
            joint_attention_dim=self.context_in_dim,
            pooled_projection_dim=self.vec_in_dim,
            guidance_embeds=self.guidance_embed,
            axes_dims_rope=list(self.axes_dim),
        )


def _check_diffusers_fields(c: Mapping[str, Any]) -> None:
    """ValueError naming the first diffusers config field whose type or value FLUX cannot take."""
    positive = ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                "pooled_projection_dim")
    for name in positive:
        if not _is_int(c[name]) or c[name] <= 0:
            raise ValueError(f"field {name!r} must be a positive int, got {c[name]!r}")
    for name in ("num_layers", "num_single_layers"):
        if not _is_int(c[name]) or c[name] < 0:
            raise ValueError(f"field {name!r} must be an int >= 0, got {c[name]!r}")
    if c["out_channels"] is not None and (not _is_int(c["out_channels"]) or c["out_channels"] <= 0):
        raise ValueError(f"field 'out_channels' must be a positive int or null, got {c['out_channels']!r}")
    if c["patch_size"] != 1 or not _is_int(c["patch_size"]):
        raise ValueError(f"field 'patch_size' is {c['patch_size']!r}; only patch_size 1 FLUX transformers are supported")
    if not isinstance(c["guidance_embeds"], bool):
        raise ValueError(f"field 'guidance_embeds' must be true or false, got {c['guidance_embeds']!r}")
    axes = c["axes_dims_rope"]
    if (not isinstance(axes, (list, tuple)) or not axes
            or not all(_is_int(a) and a > 0 and a % 2 == 0 for a in axes)):
        raise ValueError(f"field 'axes_dims_rope' must be a list of positive even ints (RoPE rotates pairs), got {axes!r}")
    if sum(axes) != c["attention_head_dim"]:
        raise ValueError(f"field 'axes_dims_rope' {list(axes)} sums to {sum(axes)}, but it must sum to "
                         f"attention_head_dim {c['attention_head_dim']}")


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """FLUX's RoPE split of a head: 1/8 for the (unused, zero) axis 0, 7/16 each for rows and columns.

    head_dim 128 gives (16, 56, 56), the released models'. Checkpoints do not store axes_dim, so the loader
    infers it with this rule (config= overrides).
    """
    if head_dim % 16:
        raise ValueError(f"cannot infer axes_dim for head_dim {head_dim} (not a multiple of 16); pass config=")
    return (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)


_DEV = FluxConfig(
    in_channels=64,
    out_channels=64,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=(16, 56, 56),
    theta=10000,
    qkv_bias=True,
    guidance_embed=True,
)

_PRESETS = {
    "flux-dev": _DEV,
    "flux-schnell": dataclasses.replace(_DEV, guidance_embed=False),
    # Real FLUX shapes at the edges (64 latent channels in/out, head_dim 64 so the kernels' fast path applies),
    # small everywhere else: a forward pass costs milliseconds on a CPU.
    "tiny": dataclasses.replace(
        _DEV,
        vec_in_dim=32,
        context_in_dim=64,
        hidden_size=128,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=default_axes_dim(64),
    ),
}
