"""A forward's backend holds for its backward, on whatever thread autograd runs it.

On a GPU the autograd engine runs backward on its own device thread, where the per-thread
``use_backend`` of the forward is not in force: the H200 profile of 2026-12-04 showed
``use_backend("torch")`` forwards followed by Triton backwards. Here a second thread plays
the device thread: the test suite's default backend is torch (TWOBP_BACKEND), the forward
forces Triton (the interpreter), and the backward must still see Triton.
"""

import threading

import pytest
import torch

import twobp
from twobp.backend import resolve_backend
from twobp.ops.linear import LinearOp


@pytest.mark.parametrize("split", [False, True])
def test_backward_on_another_thread_keeps_the_forwards_backend(monkeypatch, split):
    seen = []
    for name in ("fused_grads", "split_input_grads"):
        orig = getattr(LinearOp, name)

        def spy(self, *a, _orig=orig, **k):
            seen.append(resolve_backend(torch.device("cpu")))
            return _orig(self, *a, **k)

        monkeypatch.setattr(LinearOp, name, spy)
    torch.manual_seed(0)
    lin = twobp.TwoBPLinear(8, 4)
    ref = torch.nn.Linear(8, 4)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(5, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    assert resolve_backend(torch.device("cpu")) == "torch"
    with twobp.use_backend("triton"):
        if split:
            with twobp.split_backward(microbatch=0):
                y = lin(x)
        else:
            y = lin(x)
    errors = []
    t = threading.Thread(target=lambda: _backward(y, errors))
    t.start()
    t.join(60)
    assert not errors, errors
    assert seen == ["triton"], seen
    if split:
        with twobp.use_backend("triton"):
            twobp.backward_p2(lin)
    ref(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad)
    # and the backend forced on the main thread is untouched by the backward's pin
    assert resolve_backend(torch.device("cpu")) == "torch"


def _backward(y, errors):
    try:
        y.sum().backward()
    except Exception as e:  # noqa: BLE001 (reported by the test)
        errors.append(e)
