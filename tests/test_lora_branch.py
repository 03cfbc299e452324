"""LoRA side branches of a compiled transformer (fluxrt.lora_branch): the same output as the LoRA fused into the
reference's weights, hot-swaps and scale changes that keep shapes and the CUDA-graph weights key (so nothing
recompiles or recaptures), per-image adapters in one batch, FP8 weights, and loads that change nothing when refused."""

import copy

import pytest
import torch
from test_reference_parity import make_inputs

import fluxrt
from fluxrt import FluxConfig
from fluxrt.graphs import GraphCache, weights_key
from fluxrt.lora import Lora, LoraLayer
from fluxrt.transformer import FastFlux
from fluxrt.testing import randomize_parameters_

CFG = FluxConfig.preset("tiny")


@pytest.fixture(scope="module")
def ref():
    return randomize_parameters_(fluxrt.reference.Flux(CFG), seed=11).eval()


def random_lora(model, seed: int, rank: int = 3, alpha: float = 2.0, every: int = 1, q_part: bool = True) -> Lora:
    """A LoRA on every `every`-th linear of `model` (all of them by default: embedders, modulation, blocks, final
    layer), plus (q_part) a rank-2 layer on the q rows only (diffusers' split to_q) of each double block's image qkv."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, m in linears[::every]:
        down = torch.randn(rank, m.in_features, generator=gen) / m.in_features**0.5
        layers.append(LoraLayer(name, down, 0.3 * torch.randn(m.out_features, rank, generator=gen), alpha=alpha))
    for i in range(CFG.depth if q_part else 0):
        H = CFG.hidden_size
        layers.append(LoraLayer(f"double_blocks.{i}.img_attn.qkv", torch.randn(2, H, generator=gen) / H**0.5,
                                0.3 * torch.randn(H, 2, generator=gen), alpha=1.0, row_start=0, part="q"))
    return Lora(tuple(layers), "bfl")


def fused_reference(ref, loras_and_scales):
    model = copy.deepcopy(ref)
    for lora, scale in loras_and_scales:
        lora.fuse(model, scale)
    return model


def branched(ref, max_rank=16, max_adapters=3) -> FastFlux:
    fast = fluxrt.compile(copy.deepcopy(ref), backend="torch")
    fast.enable_lora_branches(max_rank=max_rank, max_adapters=max_adapters)
    return fast


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(CFG, batch=2, height=32, width=48, txt_len=7, seed=3)


def test_side_branch_matches_the_fused_reference(ref, inputs):
    a, b = random_lora(ref, 1), random_lora(ref, 2, rank=2, every=2)
    fast = branched(ref)
    fast.lora.load("a", a, scale=0.7)
    fast.lora.load("b", b, scale=-0.4)
    with torch.no_grad():
        want = fused_reference(ref, [(a, 0.7), (b, -0.4)])(**inputs)
        plain = ref(**inputs)
        got = fast(**inputs)
    assert (want - plain).abs().max() > 0.05, "the LoRAs must move the output for this test to mean anything"
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert fast.lora.loaded() == {"a": pytest.approx(0.7), "b": pytest.approx(-0.4)}


def test_scale_changes_and_unload(ref, inputs):
    a, b = random_lora(ref, 1), random_lora(ref, 2, every=3)
    fast = branched(ref)
    with torch.no_grad():
        before = fast(**inputs)
        fast.lora.load("a", a)
        fast.lora.load("b", b, scale=0.5)
        fast.lora.set_scales({"a": 0.25})
        torch.testing.assert_close(fast(**inputs), fused_reference(ref, [(a, 0.25), (b, 0.5)])(**inputs),
                                   atol=2e-5, rtol=1e-4)
        fast.lora.unload("a")
        torch.testing.assert_close(fast(**inputs), fused_reference(ref, [(b, 0.5)])(**inputs), atol=2e-5, rtol=1e-4)
        fast.lora.unload()
        assert torch.equal(fast(**inputs), before), "after unloading every LoRA the branch must add exactly nothing"
    assert fast.lora.loaded() == {}


def test_branches_follow_the_model_to_another_dtype(ref, inputs):
    """fast.to(torch.bfloat16) casts the branches too (and keeps the scales usable): the output then tracks the
    bf16 reference with the LoRA fused, to bf16 rounding."""
    lora = random_lora(ref, 1)
    fast = branched(ref)
    fast.lora.load("a", lora, scale=0.6)
    fast.to(torch.bfloat16)
    branches = (fast.lora.branch("img_in"), fast.lora.branch("single_blocks.0.linear2"))
    assert {b.down.dtype for b in branches} | {b.up.dtype for b in branches} == {torch.bfloat16}
    bf16 = {k: (v.to(torch.bfloat16) if k in ("img", "txt", "y") else v) for k, v in inputs.items()}
    with torch.no_grad():
        want = fused_reference(ref, [(lora, 0.6)]).to(torch.bfloat16)(**bf16).float()
        got = fast(**bf16).float()
    assert (got - want).abs().max() <= 0.03 * want.abs().max(), "the bf16 branch drifted from the fused bf16 LoRA"


def test_per_image_adapters_in_one_batch_match_each_image_alone(ref, inputs):
    """Image 0 runs LoRA a at 0.8, image 1 LoRA b at 1.0: each row equals that image run alone with only its LoRA."""
    a, b = random_lora(ref, 1), random_lora(ref, 2, every=2)
    fast = branched(ref)
    fast.lora.load("a", a)
    fast.lora.load("b", b)
    per_image = fast.lora.per_image_scales([{"a": 0.8}, {"b": 1.0}])
    with torch.no_grad():
        mixed = fast(**inputs, lora_scales=per_image)
        for row, choice in enumerate(({"a": 0.8, "b": 0.0}, {"a": 0.0, "b": 1.0})):
            fast.lora.set_scales(choice)
            alone = fast(**{k: (v[row : row + 1] if v is not None else None) for k, v in inputs.items()})
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=2e-5, rtol=1e-4)
        both = fast(**inputs, lora_scales=fast.lora.per_image_scales([{"a": 0.8, "b": 1.0}] * 2))
    assert (mixed[0] - both[0]).abs().max() > 1e-3, "image 0 must not have run LoRA b"


def test_hot_swap_keeps_shapes_and_the_graph_weights_key(ref, inputs):
    """A swap or a scale change writes buffer contents only: every tensor keeps its shape and address, and the key
    fluxrt.graphs compares before replaying a captured graph does not change (so nothing is recaptured)."""
    fast = branched(ref)
    fast.lora.load("a", random_lora(ref, 1))
    tensors = {name: (t.shape, t.data_ptr()) for name, t in fast.state_dict(keep_vars=True).items()}
    buffers = {name: (t.shape, t.data_ptr()) for name, t in fast.lora.named_buffers()}
    key = weights_key(fast._graph_weights())
    cache = GraphCache(max_entries=2)  # what GraphedCall runs on a GPU, fed the key FastFlux gives it
    cache.get("shape", key, object)
    fast.lora.unload("a")
    fast.lora.load("b", random_lora(ref, 2, every=2), scale=0.3)
    fast.lora.set_scales({"b": 0.9})
    cache.get("shape", weights_key(fast._graph_weights()), object)
    assert cache.stats == {"builds": 1, "invalidations": 0, "evictions": 0, "hits": 1}, \
        f"a LoRA swap must not invalidate captured CUDA graphs: {cache.stats}"
    assert {n: (t.shape, t.data_ptr()) for n, t in fast.state_dict(keep_vars=True).items()} == tensors
    assert {n: (t.shape, t.data_ptr()) for n, t in fast.lora.named_buffers()} == buffers
    with torch.no_grad():  # the weights themselves still invalidate graphs
        fast.model.img_in.weight.add_(0)
    assert weights_key(fast._graph_weights()) != key


def test_hot_swap_does_not_recompile_under_torch_compile(ref, inputs):
    """torch._dynamo's counters: one graph compiled for the first call; swapping LoRAs, changing scales and passing
    per-image scales of the same shape compile nothing more."""
    torch._dynamo.reset()
    fast = branched(ref)
    fast.lora.load("a", random_lora(ref, 1))
    compiled = torch.compile(fast, backend="eager", fullgraph=False)
    a, b = random_lora(ref, 1), random_lora(ref, 2, every=2)
    with torch.no_grad():
        compiled(**inputs)
        first = fast.compile_stats()["dynamo"]
        assert first["unique_graphs"] >= 1 and first["frames_compiled"] >= 1
        fast.lora.unload("a")
        fast.lora.load("b", b, scale=0.5)
        swapped = compiled(**inputs)
        fast.lora.set_scales({"b": 1.5})
        compiled(**inputs)
        assert fast.compile_stats()["dynamo"] == first, "a LoRA swap or scale change recompiled"
        torch.testing.assert_close(swapped, fused_reference(ref, [(b, 0.5)])(**inputs), atol=2e-5, rtol=1e-4)
    del a


def test_fp8_weights_with_a_lora_branch_track_bf16_with_the_lora(ref, inputs):
    """FP8 (weight-only) base weights keep their quantization; the LoRA runs beside them. >= 20 dB SQNR against the
    bf16 model with the LoRA fused."""
    lora = random_lora(ref, 1)
    bf16 = {k: (v.to(torch.bfloat16) if k in ("img", "txt", "y") else v) for k, v in inputs.items()}
    want = fused_reference(ref, [(lora, 1.0)]).to(torch.bfloat16)
    fast = fluxrt.compile(copy.deepcopy(ref).to(torch.bfloat16), quantize="fp8-weight", backend="torch")
    fast.enable_lora_branches(max_rank=8, max_adapters=2)
    fast.lora.load("a", lora)
    with torch.no_grad():
        expected, got = want(**bf16).float(), fast(**bf16).float()
        without = fluxrt.compile(copy.deepcopy(ref).to(torch.bfloat16), quantize="fp8-weight",
                                 backend="torch")(**bf16).float()
    sqnr = 10 * torch.log10(expected.pow(2).mean() / (got - expected).pow(2).mean())
    sqnr_without = 10 * torch.log10(expected.pow(2).mean() / (without - expected).pow(2).mean())
    assert sqnr >= 20, f"FP8 + LoRA branch vs bf16 + fused LoRA: {sqnr:.1f} dB"
    assert sqnr_without < sqnr - 3, "the branch must be what brings the FP8 model to the LoRA'd output"


def test_w8a8_linears_feed_the_branch_their_fp8_rows(ref, inputs):
    """W8A8 (fp8 activations): the norm kernels still emit fp8 rows for the base GEMM, and the branch reads the same
    rows through their scales (ops.trace shows both); the output tracks bf16 with the LoRA fused (>= 20 dB)."""
    from fluxrt.quantize import FP8Linear

    lora = random_lora(ref, 1)
    model = copy.deepcopy(ref).to(torch.bfloat16)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks")):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FP8Linear.from_linear(
                module, backend="torch", activations="fp8", w8a8_gemm="triton"))
    fast = FastFlux(model, backend="torch")
    fast.enable_lora_branches(max_rank=8, max_adapters=2)
    fast.lora.load("a", lora)
    bf16 = {k: (v.to(torch.bfloat16) if k in ("img", "txt", "y") else v) for k, v in inputs.items()}
    with torch.no_grad(), fluxrt.ops.trace() as ran:
        got = fast(**bf16).float()
    with torch.no_grad():
        expected = fused_reference(ref, [(lora, 1.0)]).to(torch.bfloat16)(**bf16).float()
    assert {"modulated_layer_norm_fp8", "w8a8_linear", "lora_add"} <= set(ran.backends()), ran.backends()
    sqnr = 10 * torch.log10(expected.pow(2).mean() / (got - expected).pow(2).mean())
    assert sqnr >= 20, f"W8A8 + LoRA branch vs bf16 + fused LoRA: {sqnr:.1f} dB"


def test_a_load_that_does_not_fit_changes_nothing(ref):
    fast = branched(ref, max_rank=4, max_adapters=2)
    fast.lora.load("a", random_lora(ref, 1, rank=3, q_part=False))
    before = {n: t.clone() for n, t in fast.lora.named_buffers()}
    with pytest.raises(ValueError, match="free rank"):
        fast.lora.load("b", random_lora(ref, 2, rank=2, q_part=False))  # 3 + 2 > 4 columns
    with pytest.raises(ValueError, match="loaded already"):
        fast.lora.load("a", random_lora(ref, 2, rank=1, q_part=False))
    fast.lora.load("c", random_lora(ref, 3, rank=1, every=5, q_part=False))
    with pytest.raises(ValueError, match="slots are in use"):
        fast.lora.load("d", random_lora(ref, 4, rank=1, every=7, q_part=False))
    fast.lora.unload("c")
    foreign = Lora((LoraLayer("double_blocks.0.img_attn.qkv", torch.zeros(1, 7), torch.zeros(5, 1), 1.0),), "bfl")
    with pytest.raises(fluxrt.CheckpointError, match="does not fit"):
        fast.lora.load("e", foreign)
    assert all(torch.equal(t, before[n]) for n, t in fast.lora.named_buffers()), "a refused load wrote buffers"
    assert list(fast.lora.adapters) == ["a"]


def test_bad_arguments_get_one_clear_error(ref, inputs):
    fast = branched(ref)
    fast.lora.load("a", random_lora(ref, 1))
    with pytest.raises(ValueError, match="finite"):
        fast.lora.load("b", random_lora(ref, 2), scale=float("nan"))
    with pytest.raises(KeyError, match="no LoRA named 'zzz'"):
        fast.lora.set_scales({"zzz": 1.0})
    with pytest.raises(KeyError, match="no LoRA named 'zzz'"):
        fast.lora.per_image_scales([{"zzz": 1.0}])
    with pytest.raises(ValueError, match=r"lora_scales must be a float tensor \[batch, max_adapters\]"):
        fast(**inputs, lora_scales=torch.ones(2, 5))
    with pytest.raises(ValueError, match="cannot be resized"):
        fast.enable_lora_branches(max_rank=32)
    plain = fluxrt.compile(copy.deepcopy(ref), backend="torch")
    with pytest.raises(ValueError, match="enable_lora_branches"):
        plain(**inputs, lora_scales=torch.ones(2, 3))


def test_the_hot_swap_benchmark_dry_run_checks_what_it_would_time(capsys):
    """benchmarks/bench_lora_swap.py --dry-run: the same load/swap/rescale/unload loop and its check, on the CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_lora_swap.py"
    spec = importlib.util.spec_from_file_location("bench_lora_swap", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--dry-run"]) == 0
    assert "'layers': 26" in capsys.readouterr().out  # every block and modulation linear of the tiny config


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_graph_replay_after_a_hot_swap_matches_eager(ref, inputs):
    """On a GPU with CUDA graphs: a swap and a scale change replay the graph captured before them (no recapture),
    and the replay runs the new LoRA, as the eager forward does; per-image scales get their own graph once."""
    a, b = random_lora(ref, 1), random_lora(ref, 2, every=2)
    fast = fluxrt.compile(copy.deepcopy(ref).cuda(), cuda_graphs=True)
    fast.enable_lora_branches(max_rank=16, max_adapters=2)
    x = {k: (v.cuda() if v is not None else None) for k, v in inputs.items()}
    fast.lora.load("a", a)
    fast(**x), fast(**x)
    fast.lora.unload("a")
    fast.lora.load("b", b, scale=0.7)
    torch.testing.assert_close(fast(**x), fast._forward(**x), atol=0, rtol=0)
    fast.lora.set_scales({"b": -0.3})
    torch.testing.assert_close(fast(**x), fast._forward(**x), atol=0, rtol=0)
    per_image = fast.lora.per_image_scales([{"b": 1.0}, {}])
    torch.testing.assert_close(fast(**x, lora_scales=per_image), fast._forward(**x, lora_scales=per_image), atol=0,
                               rtol=0)
    assert fast.compile_stats()["cuda_graphs"]["builds"] == 2  # one per signature: without and with lora_scales
    assert fast.compile_stats()["cuda_graphs"]["invalidations"] == 0
