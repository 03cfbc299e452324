"""fluxrt.validation: the limits hold exactly at their edges, types are refused with TypeError, `what=` names the
argument the caller's way (the CLI's flags), and pipeline options are checked against the device."""

import numpy as np
import pytest
import torch

from fluxrt import validation
from fluxrt.validation import MAX_IMAGES_PER_CALL, MAX_PIXELS, MAX_SIDE, MAX_STEPS, SEED_LIMIT

CPU = torch.device("cpu")


def test_step_limit_edges():
    assert validation.check_steps(MAX_STEPS) == MAX_STEPS and validation.check_steps(np.int64(1)) == 1
    with pytest.raises(ValueError, match=f"--steps must be between 1 and {MAX_STEPS} .*got {MAX_STEPS + 1}$"):
        validation.check_steps(MAX_STEPS + 1, what="--steps")


def test_pixel_limit_edges():
    side = int(MAX_PIXELS**0.5)
    assert validation.check_size(side, side) == (side, side)
    assert validation.check_size(MAX_SIDE, MAX_PIXELS // MAX_SIDE) == (MAX_SIDE, MAX_PIXELS // MAX_SIDE)  # a panorama
    with pytest.raises(ValueError, match=f"--width x --height = {side} x {side + 16} is .* the limit is {MAX_PIXELS:,}"):
        validation.check_size(side, side + 16, names=("--width", "--height"))
    with pytest.raises(ValueError, match=f"height must be a multiple of 16 between 16 and {MAX_SIDE}, got {MAX_SIDE + 16}"):
        validation.check_size(16, MAX_SIDE + 16)


def test_image_count_limit_edges():
    assert validation.check_image_count(MAX_IMAGES_PER_CALL, 1) == MAX_IMAGES_PER_CALL
    with pytest.raises(ValueError, match=f"asks for {MAX_IMAGES_PER_CALL + 1} images .* split it into several calls"):
        validation.check_image_count(MAX_IMAGES_PER_CALL + 1, 1)
    with pytest.raises(ValueError, match=f"max_batch_size must be between 1 and {MAX_IMAGES_PER_CALL}"):
        validation.check_batch_size(MAX_IMAGES_PER_CALL + 1)


def test_seeds():
    assert validation.check_seeds(7, 3) == [7, 8, 9]
    assert validation.check_seeds(np.array([4, 2]), 2) == [4, 2] and validation.check_seeds((1,), 1) == [1]
    assert all(type(s) is int for s in validation.check_seeds(np.int64(3), 2))
    drawn = validation.check_seeds(None, MAX_IMAGES_PER_CALL)
    assert drawn == list(range(drawn[0], drawn[0] + MAX_IMAGES_PER_CALL)) and drawn[-1] < SEED_LIMIT
    assert validation.check_seeds(None, 1) != validation.check_seeds(None, 1)  # 2**-63 odds of a false alarm
    with pytest.raises(TypeError, match=r"--seed must be an int, got float 1.5"):
        validation.check_seed(1.5, what="--seed")
    with pytest.raises(TypeError, match=r"seed\[1\] must be an int, got str"):
        validation.check_seeds([1, "2"], 2)


def test_prompt_forms():
    assert validation.check_prompt("") == [""]  # the empty prompt is a legitimate (unconditional) prompt
    assert validation.check_prompt(("a", "b")) == ["a", "b"]
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings, got bytes"):
        validation.check_prompt(b"a cat")


def test_pipeline_options_resolve_compile_by_device():
    assert validation.check_pipeline_options(CPU, None, None, "auto", False, True) is False
    assert validation.check_pipeline_options(CPU, True, "fp8-weight", "torch", True, False) is True
    assert validation.check_pipeline_options(torch.device("meta"), None, None, "auto", False, True) is False
