"""kernels/embedding.py under Triton's interpreter: the p2 scatter-add against float64 sums,
batched over micro-batches, deterministic, with padding_idx / scale_grad_by_freq, fp32 master
gradients, strided operands, and launcher errors that name the fix."""

import pytest
import torch

from checks import assert_close, poison
from twobp.kernels.embedding import embedding_dw

DTYPES = [torch.float32, torch.float16]


def _reference(ids_list, dys, v, padding_idx=None, freq=False):
    """Σ over micro-batches of the scatter-add, in float64 by plain indexing."""
    out = torch.zeros(v, dys[0].shape[1], dtype=torch.float64)
    for ids, dy in zip(ids_list, dys):
        dy = dy.double()
        if freq:
            counts = torch.bincount(ids, minlength=v).double()
            dy = dy / counts[ids][:, None]
        out.index_add_(0, ids, dy)
    if padding_idx is not None:
        out[padding_idx] = 0
    return out


def _case(v, d, rows, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, v, (m,), generator=g) for m in rows]
    if ids and ids[0].numel() > 6:
        ids[0][:6] = 1  # a long run of one id
    dys = [torch.randn(m, d, generator=g).to(dtype) for m in rows]
    return ids, dys


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,d,rows", [(61, 37, [23]), (7, 16, [5, 0, 19, 3]), (300, 130, [41, 17])],
                         ids=["one-mb", "empty-mb", "wide"])
@pytest.mark.parametrize("opts", [{}, {"padding_idx": 1}, {"scale_grad_by_freq": True}],
                         ids=["plain", "padding", "freq"])
def test_matches_float64_scatter_add(dtype, v, d, rows, opts):
    ids, dys = _case(v, d, rows, dtype)
    base = torch.randn(v, d, generator=torch.Generator().manual_seed(9)).to(dtype)
    dw = base.clone()
    embedding_dw(ids, dys, dw, **opts)
    want = base.double() + _reference(ids, dys, v, opts.get("padding_idx"), opts.get("scale_grad_by_freq", False))
    assert_close(dw, want, dtype, name="dW")


def test_fp32_master_gradient_of_fp16_rows_and_strided_operands():
    v, d = 50, 24
    ids, dys = _case(v, d, [30, 11], torch.float16, seed=3)
    wide = torch.randn(12, 2 * d, dtype=torch.float16)[:11, ::1]  # dY rows with a row stride of 2·d
    dys[1] = wide[:, :d]
    assert dys[1].stride() == (2 * d, 1)
    buf = poison(torch.empty(d, v, dtype=torch.float32)).zero_()
    dw = buf.t()  # [V, D] with strides (1, V): the kernel writes any strides
    embedding_dw(ids, dys, dw)
    assert_close(dw, _reference(ids, dys, v), torch.float16, name="fp32 dW")


def test_deterministic_and_batched_equals_sum_of_single_calls():
    v, d = 13, 33
    ids, dys = _case(v, d, [40, 40, 40], torch.float32, seed=5)
    a = torch.zeros(v, d)
    b = torch.zeros(v, d)
    embedding_dw(ids, dys, a)
    embedding_dw(ids, dys, b)
    assert torch.equal(a, b), "bit-identical reruns (no atomics)"
    c = torch.zeros(v, d)
    for i, g in zip(ids, dys):
        embedding_dw(i, g, c)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-5)


def test_untouched_rows_are_left_alone():
    v, d = 20, 16
    ids = [torch.tensor([3, 3, 7])]
    dys = [torch.ones(3, d)]
    dw = torch.full((v, d), 5.0)
    embedding_dw(ids, dys, dw, padding_idx=7)
    want = torch.full((v, d), 5.0)
    want[3] += 2
    assert torch.equal(dw, want), "only id 3's row changes: padding row 7 and unseen rows keep their values"


def test_launcher_errors_name_the_fix():
    dw = torch.zeros(5, 4)
    with pytest.raises(TypeError, match="integer indices"):
        embedding_dw(torch.zeros(3), torch.zeros(3, 4), dw)
    with pytest.raises(ValueError, match=r"expected \(3, 4\)"):
        embedding_dw(torch.zeros(3, dtype=torch.long), torch.zeros(3, 5), dw)
    with pytest.raises(ValueError, match="contiguous"):
        embedding_dw(torch.zeros(3, dtype=torch.long), torch.zeros(4, 3).t(), dw)
    with pytest.raises(ValueError, match="padding_idx"):
        embedding_dw(torch.zeros(3, dtype=torch.long), torch.zeros(3, 4), dw, padding_idx=9)
    with pytest.raises(ValueError, match="one dy per ids"):
        embedding_dw([torch.zeros(3, dtype=torch.long)], [], dw)
    with pytest.raises(TypeError, match="fp32 master"):
        embedding_dw(torch.zeros(3, dtype=torch.long), torch.zeros(3, 4), torch.zeros(5, 4, dtype=torch.float16))


def test_module_triton_backend_launches_the_kernel(monkeypatch):
    """TwoBPEmbedding on the triton backend really runs kernels/embedding.py, batched: one launch
    for all pending micro-batches."""
    import twobp
    from twobp.kernels import embedding as ke

    calls = []
    real = ke.embedding_dw
    monkeypatch.setattr(ke, "embedding_dw", lambda ids, *a, **k: (calls.append(len(ids)), real(ids, *a, **k))[1])
    m = twobp.TwoBPEmbedding(11, 16)
    with twobp.use_backend("triton"):
        for mb in range(3):
            with twobp.split_backward(microbatch=mb):
                y = m(torch.randint(0, 11, (2, 3)))
            y.sum().backward()
        twobp.backward_p2(m)
    assert calls == [3]
