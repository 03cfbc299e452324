"""FluxConfig: the hyper-parameters of a FLUX.1 transformer (BFL's FluxParams, validated)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


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
        if not self.mlp_ratio > 0:
            raise ValueError(f"FluxConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
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
    def from_diffusers(cls, config: dict[str, Any]) -> "FluxConfig":
        """From a diffusers FluxTransformer2DModel config.json (patch_size must be 1, mlp_ratio is fixed at 4)."""
        if config.get("patch_size", 1) != 1:
            raise ValueError(f"only patch_size 1 FLUX transformers are supported, got {config['patch_size']}")
        heads = config.get("num_attention_heads", 24)
        head_dim = config.get("attention_head_dim", 128)
        in_channels = config.get("in_channels", 64)
        return cls(
            in_channels=in_channels,
            out_channels=config.get("out_channels") or in_channels,
            vec_in_dim=config.get("pooled_projection_dim", 768),
            context_in_dim=config.get("joint_attention_dim", 4096),
            hidden_size=heads * head_dim,
            mlp_ratio=4.0,
            num_heads=heads,
            depth=config.get("num_layers", 19),
            depth_single_blocks=config.get("num_single_layers", 38),
            axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))),
            theta=10000,
            qkv_bias=True,
            guidance_embed=bool(config.get("guidance_embeds", False)),
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
