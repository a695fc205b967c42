"""The test method of fusedlayers.testing applied to whole modules and models.

``check_runs(run)`` runs ``run(kind)`` three times: ``"ref64"`` (the original module in
float64: the truth), ``"torch"`` (the original in float32: PyTorch's own error) and
``"ours"`` (the fusedlayers version in float32). Each call returns ``(out, tensors)``:
the output to compare and a dict of named tensors (inputs, parameters) whose gradients
of ``sum(out * g)`` are compared, g a fixed random tensor. Outputs pass at 2x and
gradients at 3x PyTorch's float32 error plus the floor (``fusedlayers.testing.compare``).
"""

import zlib

import torch

from fusedlayers import testing

KINDS = ("ref64", "torch", "ours")
DTYPE = {"ref64": torch.float64, "torch": torch.float32, "ours": torch.float32}


def seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, kind, *key, requires_grad=False):
    """The same values for every kind (drawn in float64), in the kind's dtype."""
    t = torch.randn(shape, generator=seeded("randn", shape, *key), dtype=torch.float64).to(DTYPE[kind])
    return t.requires_grad_(requires_grad)


def check_runs(run, context: str = "", valid=None) -> list:
    """Compares ``run("ours")`` with ``run("ref64")`` and ``run("torch")`` under the rule.
    ``valid``: optional bool tensor broadcastable to the output; positions outside it
    (padding) are neither compared nor given a gradient."""
    results = {}
    for kind in KINDS:
        out, tensors = run(kind)
        g = torch.randn(out.shape, generator=seeded("dout", tuple(out.shape)), dtype=torch.float64).to(out.dtype)
        if valid is not None:
            g = g * valid
            out = out * valid
        live = {n: t for n, t in tensors.items() if t.requires_grad}
        grads = torch.autograd.grad(out, list(live.values()), g, allow_unused=True)
        if kind != "ours":  # a NaN truth would make every bound inf, and any result pass
            bad = [n for n, t in [("out", out), *zip(live, grads)] if t is not None and not torch.isfinite(t).all()]
            assert not bad, f"{context}: the {kind} run is not finite in {bad[:5]}: no truth to compare with"
        results[kind] = (out.detach(), dict(zip(live, grads)))
    (o64, g64), (ot, gt), (oo, go) = (results[k] for k in KINDS)
    comps = [testing.compare("out", oo, o64, ot, testing.OUT_FACTOR)]
    assert set(go) == set(g64), (sorted(go), sorted(g64))
    for name in sorted(go):
        if g64[name] is None:
            assert go[name] is None or not go[name].any(), name
            continue
        assert go[name] is not None, f"no gradient for {name}"
        comps.append(testing.compare(f"d{name}", go[name], g64[name], gt[name], testing.GRAD_FACTOR))
    testing.assert_all_ok(comps, context)
    return comps
