"""The tolerance rule itself: it accepts PyTorch-grade results and rejects worse ones."""

import torch

from fusedlayers import testing


def test_rule_accepts_torch_grade_and_rejects_a_small_bug():
    ref = torch.randn(64, 64, dtype=torch.float64)
    torch_same = ref.half().double() + 1e-3 * torch.randn(64, 64, dtype=torch.float64)  # PyTorch's own error
    ours = ref.half()
    assert testing.compare("out", ours, ref, torch_same, testing.OUT_FACTOR).ok
    buggy = ours.clone()
    buggy[3, 5] += 0.05  # one wrong element
    assert not testing.compare("out", buggy, ref, torch_same, testing.OUT_FACTOR).ok


def test_rule_rejects_nan_and_wrong_shape():
    ref = torch.randn(8, dtype=torch.float64)
    bad = ref.float().clone()
    bad[2] = float("nan")
    assert not testing.compare("out", bad, ref, ref, testing.OUT_FACTOR).ok
    assert not testing.compare("out", ref[:4].float(), ref, ref, testing.OUT_FACTOR).ok


def test_matching_infinities_are_not_errors():
    ref = torch.tensor([float("-inf"), 1.0], dtype=torch.float64)
    assert testing.max_error(torch.tensor([float("-inf"), 1.0]), ref) == 0
    assert testing.max_error(torch.tensor([0.0, 1.0]), ref) == float("inf")


def test_grids_cover_the_design_shapes():
    full = testing.attention_grid("full")
    assert {c.nq for c in full} >= {1, 17, 113, 128, 1025} and {c.d for c in full} >= {16, 40, 59, 64, 80, 128, 256}
    assert {c.mask for c in full} == set(testing.MASKS)
    assert {c.causal for c in full} == {None, "top_left", "bottom_right"}
    assert any(c.hq != c.hkv for c in full) and any(c.nq != c.nk for c in full) and any(c.strided for c in full)
    hidden = {c.hidden for c in testing.norm_grid("full")}
    assert hidden >= {1, 7, 64, 768, 1000, 4096, 20000, 70000}


def test_rule_demands_rounding_accuracy_when_pytorchs_own_run_is_not_finite():
    ref = torch.randn(8, dtype=torch.float64)
    torch_same = ref.clone()
    torch_same[0] = float("nan")
    assert not testing.compare("out", ref.float() + 1e-3, ref, torch_same, testing.OUT_FACTOR).ok
    assert testing.compare("out", ref.float(), ref, torch_same, testing.OUT_FACTOR).ok
    assert not testing.compare("out", ref.float(), ref * float("nan"), torch_same, testing.OUT_FACTOR).ok
