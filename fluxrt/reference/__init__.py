"""Pure-PyTorch FLUX.1: the numerical truth every kernel and every accelerated model is tested against.

Imports nothing else from fluxrt (DESIGN.md §2).
"""

from .autoencoder import AutoEncoder, AutoEncoderParams
from .math import apply_rope, attention, rope
from .model import DoubleStreamBlock, EmbedND, Flux, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding

__all__ = [
    "AutoEncoder",
    "AutoEncoderParams",
    "DoubleStreamBlock",
    "EmbedND",
    "Flux",
    "LastLayer",
    "MLPEmbedder",
    "SingleStreamBlock",
    "apply_rope",
    "attention",
    "rope",
    "timestep_embedding",
]
