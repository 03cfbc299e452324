import os

import pytest
import torch

# Triton runs on a CPU-only machine only through its interpreter, which must be chosen before triton is
# imported (DESIGN.md §4). On a GPU machine the real compiler is used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references must be fp32, not tf32
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_flux_pipeline(tmp_path_factory):
    """A real, tiny, randomly initialised diffusers FluxPipeline (CPU, float32, guidance-distilled), built offline.

    Shared by the whole session: do not mutate it (move it to another device or dtype, swap its modules); build your
    own with `tiny_pipeline.build_tiny_flux_pipeline` for that. Generate at sizes divisible by 16, e.g. 64x64.
    """
    # Imported here, not at the top: it pulls in diffusers and transformers (seconds of import), which only
    # sessions that use the fixture should pay for.
    # tests/ is on sys.path because pytest inserts this conftest's (package-less) folder.
    from tiny_pipeline import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux"))
