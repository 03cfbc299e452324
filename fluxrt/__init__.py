"""fluxrt: a fast, exact inference runtime for FLUX.1 (see DESIGN.md for the architecture and API contract)."""

from . import reference, sampling
from .config import FluxConfig
from .convert import CheckpointError, bfl_to_diffusers, diffusers_to_bfl
from .loading import load_transformer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FluxConfig",
    "bfl_to_diffusers",
    "diffusers_to_bfl",
    "load_transformer",
    "reference",
    "sampling",
]
