"""fluxrt.serve.models: the pipeline `fluxrt serve` and the Ray replicas build from --model, with hot-swapped
--lora files named by stem, and the model name they serve it under."""

import pytest
import torch
from test_pipeline_lora import write_lora

from fluxrt.serve.models import load_pipeline, parse_lora_spec, served_model_name


def test_loras_load_hot_swapped_and_named_by_stem(tmp_path):
    a, b = write_lora(tmp_path / "style.safetensors", seed=0), write_lora(tmp_path / "ink.safetensors", seed=1)
    pipe = load_pipeline("tiny-random", "cpu", backend="torch", loras=[parse_lora_spec(f"{a}:0.5"),
                                                                        parse_lora_spec(b)])
    assert pipe.lora_hotswap and pipe.loras == {"style": 0.5, "ink": 1.0}
    call = dict(width=32, height=32, num_steps=2, seed=1, output_type="pt")
    with torch.no_grad():
        assert (pipe("a cat", **call, loras={"style": 1.0}) - pipe("a cat", **call, loras={})).abs().max() > 0.02
    assert not load_pipeline("tiny-random", "cpu", compile=False).lora_hotswap


def test_lora_specs_and_model_names(tmp_path):
    path = tmp_path / "a:b.safetensors"
    path.write_bytes(b"")
    assert parse_lora_spec(str(path)) == (path, 1.0)  # a ':' in the path without a number after it
    assert parse_lora_spec(f"{path}:0.25") == (path, 0.25)
    with pytest.raises(ValueError, match="must be a finite number"):
        parse_lora_spec(f"{path}:nan")
    with pytest.raises(ValueError, match="does not exist"):
        parse_lora_spec(str(tmp_path / "none.safetensors"))
    assert served_model_name("tiny-random-fill") == "tiny-random-fill"
    assert served_model_name("tiny") == "tiny"
    assert served_model_name(str(tmp_path / "FLUX.1-dev")) == "FLUX.1-dev"
