"""Test setup: device, backends, Triton interpreter, markers.

Without a GPU, Triton kernels run on CPU tensors through the Triton interpreter. The
interpreter is decided when a kernel is decorated (at import of its module), so the
variable is set here, before any test imports fusedlayers' kernel modules.
"""

import contextlib
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedlayers  # noqa: E402  (after TRITON_INTERPRET)
from fusedlayers import dispatch  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the full grid (tests marked slow)")


def pytest_collection_modifyitems(config, items):
    wants_slow = config.getoption("--slow") or "slow" in (config.getoption("-m") or "")
    for item in items:
        if "slow" in item.keywords and not wants_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --slow"))
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def pytest_generate_tests(metafunc):
    """``full_attention_case`` / ``full_norm_case``: the full grid beyond the default one,
    collected only with --slow (or -m slow), so a default run lists no thousands of skips."""
    from fusedlayers import testing

    config = metafunc.config
    slow = config.getoption("--slow") or "slow" in (config.getoption("-m") or "")
    for name, grid in (("full_attention_case", testing.attention_grid), ("full_norm_case", testing.norm_grid)):
        if name in metafunc.fixturenames:
            cases = grid("full")[len(grid("default")):] if slow else []
            metafunc.parametrize(name, cases, ids=str)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_backend_choice():
    """Each test decides its calls' backends afresh: tests replace backends' rules (``why_not``, the
    dispatch order), and ``dispatch.select`` keeps its answer per call signature for the process."""
    dispatch._SELECTED.clear()
    yield


def dtype_id(x) -> str:
    """Test id of a parameter, dtypes without their ``torch.`` prefix: ``float16``."""
    return str(x).replace("torch.", "")


@contextlib.contextmanager
def torch_threads(n: int):
    """Runs the block on ``n`` torch threads and restores the former count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """The test runs on one torch thread (training results that do not depend on the machine's
    core count), the former count restored after. Use with ``pytest.mark.usefixtures``."""
    with torch_threads(1):
        yield


def skip_unless_serves(family: str, backend: str, call) -> None:
    """Skips the test, with the backend's own reason, when it cannot serve the call."""
    reason = dispatch.why_not(family, backend, call)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
