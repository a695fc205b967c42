"""fusedlayers.swap / unswap on torch.nn models: what is replaced, what is kept (the same
Parameter objects, state_dict keys, mode, dtype, hooks), what is left and why, the
round trip, and torch.compile(fullgraph=True) of a swapped model without graph breaks."""

import copy
import subprocess
import sys

import pytest
import torch

import fusedlayers
from fusedlayers import nn as fnn
from module_rule import check_runs, randn

E, H = 32, 4


def _encoder(layers=2, **kwargs):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, H, 64, batch_first=True, **kwargs)
    return torch.nn.TransformerEncoder(layer, layers, norm=torch.nn.LayerNorm(E), enable_nested_tensor=False)


class Block(torch.nn.Module):
    """A user model: attention, norms, and modules swap() must leave or mention."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(E, H, batch_first=True)
        self.ln = torch.nn.LayerNorm(E)
        self.rms = torch.nn.RMSNorm(E, eps=1e-6)
        self.bn = torch.nn.BatchNorm1d(E)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(E, E), torch.nn.GELU())

    def forward(self, x, pad):
        x = self.ln(x + self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0])
        return self.rms(x + self.mlp(x))


def test_swap_keeps_weights_and_matches():
    torch.manual_seed(0)
    model = Block().eval()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    report = fusedlayers.swap(model)
    assert {e.name for e in report.swapped} == {"attn", "ln", "rms"}
    assert [(e.name, e.reason) for e in report.left] == [("bn", "no fusedlayers drop-in for this class")]
    assert type(model.attn) is fnn.MultiheadAttention and type(model.ln) is fnn.LayerNorm
    assert type(model.rms) is fnn.RMSNorm and type(model.bn) is torch.nn.BatchNorm1d
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert list(model.state_dict()) == keys
    assert not model.training and not model.attn.training
    text = str(report)
    assert "3 module(s) swapped, 1 left" in text and "torch.nn.LayerNorm -> fusedlayers.nn.LayerNorm" in text


@pytest.mark.parametrize("norm_first", [False, True])
def test_swapped_encoder_matches_original_with_gradients(norm_first):
    original = _encoder(norm_first=norm_first).eval()
    swapped = copy.deepcopy(original)
    fusedlayers.swap(swapped)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True

    def run(kind):
        model = {"ref64": copy.deepcopy(original).double(), "torch": original, "ours": swapped}[kind]
        x = randn((3, 7, E), kind, "x", requires_grad=True)
        return model(x, src_key_padding_mask=pad), {"x": x, **dict(model.named_parameters())}

    check_runs(run, f"swapped TransformerEncoder norm_first={norm_first}")


def test_optimizer_and_state_dict_round_trip():
    """An optimizer built before the swap trains the swapped model; state_dicts load both ways."""
    model = _encoder().train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fusedlayers.swap(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(2, 5, E)).square().mean().backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    fresh = _encoder()
    fresh.load_state_dict(model.state_dict(), strict=True)  # swapped -> torch
    other = _encoder()
    fusedlayers.swap(other)
    other.load_state_dict(fresh.state_dict(), strict=True)  # torch -> swapped
    x = torch.randn(2, 5, E)
    torch.testing.assert_close(other.eval()(x), fresh.eval()(x), atol=1e-5, rtol=1e-5)


def test_unswap_restores_the_original_modules():
    model = _encoder().eval()
    originals = dict(model.named_modules())
    fusedlayers.swap(model)
    assert type(model.layers[0]) is fnn.TransformerEncoderLayer
    assert type(model.layers[0].self_attn) is fnn.MultiheadAttention
    model.train()
    with torch.no_grad():
        model.norm.weight.fill_(2.0)  # changes made while swapped are kept
    report = fusedlayers.unswap(model)
    assert len(report.swapped) == 2 * 4 + 1 and not report.left
    assert all(m is originals[n] for n, m in model.named_modules())
    assert all(m.training for m in model.modules())
    assert torch.equal(model.norm.weight, torch.full((E,), 2.0))
    assert "restored" in str(report)
    assert not fusedlayers.unswap(model).swapped  # nothing left to restore


def test_include_and_exclude():
    model = _encoder()
    report = fusedlayers.swap(model, include=["LayerNorm", "MultiheadAttention"], exclude=["layers.1.*"])
    assert type(model.layers[0]) is torch.nn.TransformerEncoderLayer  # not included
    assert type(model.layers[0].self_attn) is fnn.MultiheadAttention
    assert type(model.layers[1].norm1) is torch.nn.LayerNorm
    assert type(model.norm) is fnn.LayerNorm
    assert {e.name for e in report.left if e.reason == "excluded"} == {"layers.1.self_attn", "layers.1.norm1",
                                                                      "layers.1.norm2"}
    x = torch.randn(2, 5, E)
    model.eval()
    ref = _encoder().eval()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    model = _encoder()
    fusedlayers.swap(model, exclude=[torch.nn.LayerNorm])
    assert type(model.layers[0]) is fnn.TransformerEncoderLayer and type(model.layers[0].norm1) is torch.nn.LayerNorm
    model.eval()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)  # unfused norms inside our layer


def test_hooks_still_fire():
    model = _encoder().eval()
    seen = []
    model.layers[0].norm1.register_forward_hook(lambda m, i, o: seen.append("norm1"))
    model.layers[0].self_attn.register_forward_pre_hook(lambda m, a: seen.append("attn"))
    fusedlayers.swap(model)
    ref = _encoder().eval()
    x = torch.randn(2, 5, E)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    assert seen == ["attn", "norm1"]  # the hooked norm runs as a module (not fused into the add)


def test_left_modules_and_reasons():
    class MyNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(MyNorm(E), torch.nn.LayerNorm(E), torch.nn.LayerNorm(E))
    model[2].forward = lambda x: x  # patched on the instance, as accelerate does
    report = fusedlayers.swap(model)
    reasons = {e.name: e.reason for e in report.left}
    assert "subclass of torch.nn.LayerNorm" in reasons["0"] and "patched" in reasons["2"]
    assert [e.name for e in report.swapped] == ["1"]
    root = torch.nn.LayerNorm(E)
    report = fusedlayers.swap(root)
    assert not report.swapped and "root module" in report.left[0].reason


def test_shared_module_is_swapped_once():
    norm = torch.nn.LayerNorm(E)
    model = torch.nn.ModuleDict({"a": norm, "b": torch.nn.Sequential(norm)})
    fusedlayers.swap(model)
    assert model["a"] is model["b"][0] and type(model["a"]) is fnn.LayerNorm
    fusedlayers.unswap(model)
    assert model["a"] is norm and model["b"][0] is norm


def test_swap_keeps_dtype_and_backend():
    model = _encoder().double()
    fusedlayers.swap(model, backend="reference")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.layers[0].backend == "reference" and model.layers[0].self_attn.backend == "reference"
    assert model(torch.randn(2, 5, E, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="backend"):
        fusedlayers.swap(model, backend="fastest")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_compile_fullgraph_no_graph_break(backend):
    """A swapped TransformerEncoder compiles into one graph, forward and backward."""
    from torch._dynamo.utils import counters

    model = _encoder(dropout=0.0).train()
    fusedlayers.swap(model, backend=backend)
    x = torch.randn(2, 6, E)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out_c, out_e = compiled(xs[0], src_key_padding_mask=pad), model(xs[1], src_key_padding_mask=pad)
    out_c.sum().backward()
    out_e.sum().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(xs[0].grad, xs[1].grad)


def test_import_does_not_import_transformers():
    code = "import sys, fusedlayers; fusedlayers.nn; fusedlayers.swap; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("model", [3, "model", {"layer": torch.nn.LayerNorm(4)}, [torch.nn.LayerNorm(4)]],
                         ids=lambda m: type(m).__name__)
def test_swap_and_unswap_name_a_model_that_is_not_a_module(model):
    for fn in (fusedlayers.swap, fusedlayers.unswap):
        with pytest.raises(TypeError, match=rf"{fn.__name__}\(model\): model must be a torch.nn.Module, got "):
            fn(model)


@pytest.mark.parametrize("include,error,says", [
    (5, TypeError, "include must be .*got int 5"),
    ([5], TypeError, "include must be .*an element 5"),
    ([int], TypeError, "include: int is not a torch.nn.Module subclass"),
    ("", ValueError, "include: an empty pattern"),
    (torch.nn.LayerNorm(4), TypeError, "include must be .*LayerNorm instance \\(pass its class\\)"),
    ({"LayerNorm": 1}, TypeError, "include must be .*got dict"),
])
def test_swap_names_a_bad_include_or_exclude(include, error, says):
    model = torch.nn.Sequential(torch.nn.LayerNorm(4))
    with pytest.raises(error, match=says):
        fusedlayers.swap(model, include=include)
    with pytest.raises(error, match=says.replace("include", "exclude")):
        fusedlayers.swap(model, exclude=include)
    assert type(model[0]) is torch.nn.LayerNorm  # nothing swapped on a refused call
