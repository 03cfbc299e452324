"""fluxrt: a fast, exact inference runtime for FLUX.1 (see DESIGN.md for the architecture and API contract)."""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _find_source_kernels() -> None:
    # kernels/ sits at the repository root and is installed as fluxrt.kernels (DESIGN.md §2). Installs (editable
    # too) resolve it from the package metadata; a source checkout used through PYTHONPATH, as on a GPU box with
    # its own torch and no network, has no install step, so map ../kernels here. Its __init__ imports nothing.
    kernels = _Path(__file__).resolve().parent.parent / "kernels"
    if _importlib_util.find_spec(f"{__name__}.kernels") is None and (kernels / "__init__.py").is_file():
        spec = _importlib_util.spec_from_file_location(
            f"{__name__}.kernels", kernels / "__init__.py", submodule_search_locations=[str(kernels)]
        )
        module = _importlib_util.module_from_spec(spec)
        _sys.modules[spec.name] = module
        spec.loader.exec_module(module)


_find_source_kernels()

from . import quantize, reference, sampling  # noqa: E402
from .config import FluxConfig  # noqa: E402
from .convert import (  # noqa: E402
    CheckpointError,
    bfl_to_diffusers,
    diffusers_to_bfl,
    vae_bfl_to_diffusers,
    vae_diffusers_to_bfl,
)
from .call_inputs import FluxPipelineOutput  # noqa: E402
from .loading import load_autoencoder, load_transformer  # noqa: E402
from .lora import Lora, load_lora  # noqa: E402
from .pipeline import FluxPipeline  # noqa: E402
from .quantize import save_transformer  # noqa: E402
from .serving import GenerationRequest, GenerationResult  # noqa: E402
from .validation import NonFiniteError  # noqa: E402
from .compiler import compile  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FluxConfig",
    "FluxPipeline",
    "FluxPipelineOutput",
    "Lora",
    "GenerationRequest",
    "GenerationResult",
    "NonFiniteError",
    "compile",
    "bfl_to_diffusers",
    "diffusers_to_bfl",
    "load_autoencoder",
    "load_lora",
    "load_transformer",
    "quantize",
    "reference",
    "sampling",
    "save_transformer",
    "vae_bfl_to_diffusers",
    "vae_diffusers_to_bfl",
]
