"""CUDA graphs are dropped whenever the weights they read change (fluxrt.graphs): the cache logic and the weights key
on the CPU, real capture and replay after weight changes on a GPU."""

import pytest
import torch
from test_compile_atomic import reference_flux, reference_inputs

import fluxrt
from fluxrt.graphs import GraphCache, GraphedCall, weights_key
from fluxrt.transformer import FastFlux


class Built:
    """Counts the values a GraphCache builds (each stands for one captured graph)."""

    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1
        return f"graph {self.count}"


def test_one_value_per_key_under_the_same_weights():
    cache, build = GraphCache(max_entries=2), Built()
    assert cache.get("32x32", ("w",), build) == "graph 1"
    assert cache.get("32x32", ("w",), build) == "graph 1"
    assert cache.get("64x64", ("w",), build) == "graph 2"
    assert cache.get("32x32", ("w",), build) == "graph 1"
    assert build.count == 2


def test_least_recently_used_goes_first():
    cache, build = GraphCache(max_entries=2), Built()
    cache.get("a", (), build), cache.get("b", (), build), cache.get("a", (), build)
    cache.get("c", (), build)  # evicts b, the least recently used
    assert list(cache.entries) == ["a", "c"]
    assert cache.get("b", (), build) == "graph 4"


def test_other_weights_drop_every_value():
    cache, build = GraphCache(max_entries=4), Built()
    cache.get("a", ("w1",), build), cache.get("b", ("w1",), build)
    assert cache.get("a", ("w2",), build) == "graph 3"
    assert list(cache.entries) == ["a"]  # b's graph, captured over the old weights, is gone too
    assert cache.get("b", ("w2",), build) == "graph 4"


def test_stats_count_builds_hits_invalidations_and_evictions():
    cache, build = GraphCache(max_entries=2), Built()
    cache.get("a", ("w1",), build), cache.get("a", ("w1",), build), cache.get("b", ("w1",), build)
    cache.get("c", ("w1",), build)  # evicts a
    cache.get("c", ("w2",), build)  # the weights changed: drops b and c, builds c again
    assert cache.stats == {"builds": 4, "invalidations": 1, "evictions": 1, "hits": 1}


def test_max_graphs_must_be_positive():
    with pytest.raises(ValueError, match="max_graphs must be >= 1"):
        GraphCache(0)


def fast_flux(seed=0):
    return fluxrt.compile(reference_flux(seed=seed), backend="torch")


@torch.no_grad()
def test_weights_key_is_stable_across_calls():
    fast, x = fast_flux(), reference_inputs()
    key = weights_key(fast._graph_weights())
    fast(**x), fast(**x)
    assert weights_key(fast._graph_weights()) == key  # a forward writes no weight: graphs are replayed, not re-captured


@torch.no_grad()
@pytest.mark.parametrize("change", ["to float64 and back", "load_state_dict", "in-place edit", "parameter swap",
                                    "batched modulation edit", "batched modulation swap"])
def test_weights_key_changes_with_the_weights(change):
    fast = fast_flux(seed=1)
    key = weights_key(fast._graph_weights())
    linear = fast.model.single_blocks[0].linear2
    if change == "to float64 and back":
        fast.to(torch.float64).to(torch.float32)
    elif change == "load_state_dict":  # same storage, new values
        fast.load_state_dict({k: v * 0.5 for k, v in fast.state_dict().items()})
    elif change == "in-place edit":
        linear.weight.mul_(0.5)
    elif change == "parameter swap":
        linear.weight = torch.nn.Parameter(linear.weight * 0.5, requires_grad=False)
    elif change == "batched modulation edit":
        fast.modulation.bias.add_(1.0)
    else:
        fast.modulation.bias = torch.nn.Parameter(fast.modulation.bias + 1.0, requires_grad=False)
    assert weights_key(fast._graph_weights()) != key


class EagerCapture:
    """Stands in for a captured CUDA graph on the CPU: records the weights key it was 'captured' under and runs the
    call eagerly (a CPU cannot capture; test_gpu_* below do it for real)."""

    def __init__(self, fast, kwargs):
        self.fast, self.weights = fast, weights_key(fast._graph_weights())

    def __call__(self, kwargs):
        assert weights_key(self.fast._graph_weights()) == self.weights, "replayed over changed weights"
        return self.fast._forward(**kwargs)


class EagerGraphedCall(GraphedCall):
    def _capture(self, kwargs):
        self.captures += 1
        return EagerCapture(self.module.__self__, kwargs)


@torch.no_grad()
def test_fast_flux_graphs_are_dropped_when_its_weights_change():
    """FastFlux's own GraphedCall (cuda_graphs=True), its CUDA capture replaced by an eager stand-in."""
    fast, x = FastFlux(reference_flux(seed=2), backend="torch", cuda_graphs=True), reference_inputs()
    graphed = EagerGraphedCall(fast.graphs.module, weights=fast.graphs.weights)
    expected = graphed(**x)
    graphed(**x)
    assert graphed.captures == 1
    fast.to(torch.float64).to(torch.float32)
    torch.testing.assert_close(graphed(**x), expected, atol=0, rtol=0)
    assert graphed.captures == 2
    fast.model.final_layer.linear.weight.mul_(2.0)
    torch.testing.assert_close(graphed(**x), fast._forward(**x), atol=0, rtol=0)
    assert graphed.captures == 3 and len(graphed.graphs) == 1


# ---- real capture and replay ----


def cuda_fast_flux(seed=0):
    model = reference_flux(seed=seed).cuda()
    return fluxrt.compile(model, cuda_graphs=True)


def cuda_inputs():
    return {k: (v.cuda() if v is not None else None) for k, v in reference_inputs().items()}


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("change", ["in-place edit", "parameter swap", "load_state_dict", "to cpu and back"])
def test_gpu_replay_after_a_weight_change_matches_eager(change):
    fast, x = cuda_fast_flux(seed=3), cuda_inputs()
    fast(**x), fast(**x)
    assert fast.graphs.captures == 1  # the second call replayed
    linear = fast.model.double_blocks[0].img_attn.proj
    if change == "in-place edit":
        linear.weight.mul_(0.5)
    elif change == "parameter swap":
        linear.weight = torch.nn.Parameter(linear.weight * 0.5, requires_grad=False)
    elif change == "load_state_dict":
        fast.load_state_dict({k: v * 0.5 for k, v in fast.state_dict().items()})
    else:
        fast.to("cpu").to("cuda")
    expected = fast._forward(**x)  # eager, on the changed weights
    torch.testing.assert_close(fast(**x), expected, atol=0, rtol=0)
    torch.testing.assert_close(fast(**x), expected, atol=0, rtol=0)
    assert fast.graphs.captures == 2  # captured once over the new weights, then replayed
