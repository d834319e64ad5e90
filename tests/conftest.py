"""Test-wide settings.

Triton's interpreter must be chosen before triton is imported, so it is set here, first.
The default backend for CPU tensors is then pinned to the torch reference, so only tests
that ask for the kernels (``twobp.use_backend("triton")`` or the launchers themselves)
pay for the interpreter.
"""

import os
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ (installed as
# twobp.kernels) shadows Hugging Face's `kernels` package, which transformers >= 5.25 imports
# when it is installed (it depends on it): every transformers import then fails.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TWOBP_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_store():
    """Every test starts and must end with an empty activation store."""
    import twobp

    twobp.default_store().clear()
    yield
    store = twobp.default_store()
    leaked = store.report()
    store.clear()
    if leaked.entries:
        pytest.fail(f"test leaked saved activations:\n{leaked}")
