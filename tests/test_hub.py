"""fusedlayers.hub: layers and mapping for the ``kernels`` package's ``kernelize``, checked on
a tiny Llama on CPU in training and inference modes.

The contract tests need no ``kernels`` package: they apply the hub's rules (a layer class
is stateless, adds no members but ``has_backward`` / ``can_torch_compile``, and its
forward's parameters match the replaced class's) and its replacement (``module.forward =
MethodType(layer.forward, module)``) as ``kernels`` 0.17 does. The last test runs the real
``kernels.kernelize`` where ``kernels`` is installed.
"""

import inspect
import os
import subprocess
import sys
from types import MethodType

import pytest
import torch
from torch import nn

import fusedlayers
from fusedlayers import hub, ops

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402


def _tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def _hub_rules(layer, replaced):
    """The checks of kernels' _validate_layer (kernels 0.17.2)."""
    assert issubclass(layer, nn.Module)
    assert layer.__init__ is nn.Module.__init__
    extra = {n for n, _ in inspect.getmembers(layer)} - {n for n, _ in inspect.getmembers(nn.Module)}
    assert extra <= {"can_torch_compile", "has_backward"}, extra
    params = list(inspect.signature(layer.forward).parameters.values())
    ref = list(inspect.signature(replaced.forward).parameters.values())
    assert len(params) == len(ref)
    assert [p.kind for p in params] == [p.kind for p in ref]


def test_layers_follow_the_hub_contract():
    _hub_rules(hub.RMSNorm, LlamaRMSNorm)
    _hub_rules(hub.LayerNorm, nn.LayerNorm)
    assert hub.layers.RMSNorm is hub.RMSNorm and hub.RMSNorm.has_backward and hub.RMSNorm.can_torch_compile


def test_mapping_and_repository():
    m = hub.mapping()
    assert set(m) == {"RMSNorm", "LayerNorm"} and set(m["RMSNorm"]) == {"cpu", "cuda"}
    repo = m["RMSNorm"]["cpu"]
    assert repo.load() is hub.RMSNorm and repo.layer_name == "RMSNorm"
    assert repo == hub.Repository("RMSNorm") and hash(repo) == hash(hub.Repository("RMSNorm"))
    with pytest.raises(ValueError, match="layer_name"):
        hub.Repository("Attention")
    with pytest.raises(ValueError, match="devices"):
        hub.mapping(devices=("mps",))


def _count_norm_calls(monkeypatch):
    counts = {"rms_norm": 0, "layer_norm": 0}
    for name in counts:
        real = getattr(ops, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    return counts


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_kernelized_llama_matches(monkeypatch, training):
    """Every LlamaRMSNorm's forward replaced the way kernelize does: same logits and
    gradients as the original model, and fusedlayers' kernel serves each norm call."""
    model, ref = _tiny_llama(), _tiny_llama()
    model.train(training), ref.train(training)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    assert len(norms) == 5  # two per layer and the final one
    layer = hub.mapping()["RMSNorm"]["cpu"].load()
    for m in norms:
        m.forward = MethodType(layer.forward, m)
    counts = _count_norm_calls(monkeypatch)
    out, expected = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert counts["rms_norm"] == 5
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if training:
        out.square().mean().backward()
        expected.square().mean().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_layer_norm_layer_matches_torch():
    torch.manual_seed(0)
    ln = nn.LayerNorm(16)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    x = torch.randn(3, 5, 16)
    expected = ln(x)
    ln.forward = MethodType(hub.LayerNorm.forward, ln)
    torch.testing.assert_close(ln(x), expected, rtol=1e-5, atol=1e-5)
    ln2 = nn.LayerNorm((5, 16))  # two normalised dims: torch's own layer_norm
    expected = ln2(x)
    ln2.forward = MethodType(hub.LayerNorm.forward, ln2)
    torch.testing.assert_close(ln2(x), expected)


# Run in a child process from an empty folder: this checkout's own top-level `kernels/`
# folder (the Triton kernels) would shadow the `kernels` package on the test's sys.path.
_KERNELIZE = """
import sys, torch, kernels, transformers
from transformers.models.llama.modeling_llama import LlamaRMSNorm
import fusedlayers.hub as hub
from fusedlayers import ops
training = sys.argv[1] == "training"
LlamaRMSNorm.kernel_layer_name = "RMSNorm"  # what the hub decorator sets
config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64)
models = []
for _ in range(2):
    torch.manual_seed(0)
    models.append(transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").train(training))
model, ref = models
mode = kernels.Mode.TRAINING if training else kernels.Mode.INFERENCE
with kernels.use_kernel_mapping(hub.mapping(), inherit_mapping=False):
    kernels.kernelize(model, mode=mode, device="cpu", use_fallback=kernels.KernelizeFallback.NONE)
calls = []
real = ops.rms_norm
ops.rms_norm = lambda *a, **k: calls.append(1) or real(*a, **k)
ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
out, expected = model(input_ids=ids).logits, ref(input_ids=ids).logits
assert len(calls) == 5, calls
torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
if training:
    out.sum().backward()
    expected.sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
print("kernelize ok", len(calls))
"""


def _kernels_package():
    """The `kernels` package's location, None when it is not installed."""
    import importlib.machinery
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if p and os.path.abspath(p) not in (repo, os.getcwd())]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    return None if spec is None or not spec.origin or os.path.dirname(os.path.dirname(spec.origin)) == repo \
        else spec.origin


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_kernels_kernelize(tmp_path, training):
    """The real kernels.kernelize with fusedlayers' mapping (no hub access)."""
    if _kernels_package() is None:
        pytest.skip("the kernels package is not installed")
    script = tmp_path / "kernelize.py"
    script.write_text(_KERNELIZE)
    run = subprocess.run([sys.executable, str(script), "training" if training else "inference"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "kernelize ok 5" in run.stdout


def test_hub_is_loaded_on_first_use():
    assert fusedlayers.hub is hub
