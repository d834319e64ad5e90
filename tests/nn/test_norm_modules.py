"""TwoBPLayerNorm / TwoBPRMSNorm against nn.LayerNorm / nn.RMSNorm, normal and split, both backends."""

import pytest
import torch
from torch import nn

import twobp
from checks import assert_close
from twobp.nn.norm import TwoBPLayerNorm, TwoBPRMSNorm

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16]
# (twin kind, constructor kwargs): affine with and without bias, no affine, RMSNorm eps=None
CONFIGS = {
    "ln": ("layer", {}),
    "ln-nobias": ("layer", {"bias": False}),
    "ln-noaffine": ("layer", {"elementwise_affine": False}),
    "rms": ("rms", {"eps": 1e-6}),
    "rms-noaffine-epsNone": ("rms", {"elementwise_affine": False}),
}
N = 53


def _classes(kind):
    return (nn.LayerNorm, TwoBPLayerNorm) if kind == "layer" else (nn.RMSNorm, TwoBPRMSNorm)


def _pair(kind, kwargs, n=N, dtype=torch.float32, seed=0):
    """(torch twin, twobp module) with the same random (non-default) affine parameters."""
    ref_cls, cls = _classes(kind)
    ref = ref_cls(n, dtype=dtype, **kwargs)
    m = cls(n, dtype=dtype, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1.0)
    m.load_state_dict(ref.state_dict())
    return ref, m


def _reference(ref, x, dy):
    """float64 autograd through a float64 copy of the torch twin: y, dx, {name: grad}."""
    ref64 = type(ref)(ref.normalized_shape, **_ctor_kwargs(ref), dtype=torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    if isinstance(ref, nn.RMSNorm) and ref.eps is None:
        # torch's eps=None follows the input dtype (opmath); keep the low-precision run's eps
        from twobp.nn.norm import _rms_default_eps
        ref64.eps = _rms_default_eps(x.dtype)
    x64 = x.detach().double().requires_grad_()
    y = ref64(x64)
    y.backward(dy.double())
    return y.detach(), x64.grad, {k: p.grad for k, p in ref64.named_parameters()}


def _ctor_kwargs(ref):
    kw = {"eps": ref.eps, "elementwise_affine": ref.elementwise_affine}
    if isinstance(ref, nn.LayerNorm):
        kw["bias"] = ref.bias is not None or not ref.elementwise_affine
    return kw


# ----------------------------------------------------------------------------------------
# drop-in
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_drop_in_for_torch_twin(name):
    kind, kwargs = CONFIGS[name]
    ref_cls, cls = _classes(kind)
    torch.manual_seed(3)
    ref = ref_cls(N, **kwargs)
    torch.manual_seed(3)
    m = cls(N, **kwargs)
    assert isinstance(m, ref_cls) and isinstance(m, twobp.TwoBPModule)
    assert list(m.state_dict()) == list(ref.state_dict())
    for (ka, a), (kb, b) in zip(ref.state_dict().items(), m.state_dict().items()):
        assert ka == kb and torch.equal(a, b), f"init of {ka} must match the torch twin's"
    assert repr(m).replace(cls.__name__, ref_cls.__name__) == repr(ref)
    assert m.eps == ref.eps and m.normalized_shape == ref.normalized_shape == (N,)
    half = cls(N, dtype=torch.float16, **kwargs)
    assert all(p.dtype == torch.float16 for p in half.parameters())


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_multi_dim_normalized_shape_is_not_implemented(kind):
    ref_cls, cls = _classes(kind)
    with pytest.raises(NotImplementedError, match=r"last dim only.*normalized_shape=\(4, 8\).*normalized_shape=32"):
        cls([4, 8])
    m = ref_cls([4, 8])
    m.__class__ = cls  # what twobp.convert does
    with pytest.raises(NotImplementedError, match="last dim only"):
        m(torch.randn(2, 4, 8))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_class_swap_keeps_parameters(kind):
    """A torch module turned into its twin by a class swap keeps its Parameter objects."""
    ref_cls, cls = _classes(kind)
    m = ref_cls(N)
    weight = m.weight
    x = torch.randn(4, N)
    expected = m(x)
    m.__class__ = cls
    assert m.weight is weight
    torch.testing.assert_close(m(x), expected)


# ----------------------------------------------------------------------------------------
# parity with float64 autograd, normal and split mode
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [False, True], ids=["normal", "split"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_float64_autograd(name, split, dtype, backend):
    kind, kwargs = CONFIGS[name]
    ref, m = _pair(kind, kwargs, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(37, N, generator=gen) * 2 + 0.5).to(dtype).requires_grad_()
    dy = torch.randn(37, N, generator=gen).to(dtype)
    y64, dx64, grads64 = _reference(ref, x, dy)
    params = dict(m.named_parameters())
    with twobp.use_backend(backend):
        if split:
            with twobp.split_backward(microbatch=0):
                y = m(x)
            y.backward(dy)
            assert all(p.grad is None for p in params.values()), "p1 must leave .grad untouched"
            assert_close(x.grad, dx64, dtype, name="dX after p1")
            assert twobp.backward_p2(m) == (1 if params else 0)
        else:
            y = m(x)
            y.backward(dy)
    assert y.dtype == dtype
    assert_close(y, y64, dtype, name="Y")
    assert_close(x.grad, dx64, dtype, name="dX")
    assert set(params) == set(grads64)
    for k, p in params.items():
        assert_close(p.grad, grads64[k], dtype, name=f"d{k}", scale=2)
    assert twobp.default_store().is_empty()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_microbatches_3d_batched_and_accumulating(kind, backend):
    """Three micro-batches of [2, T, N] inputs; p2 of one, then the rest batched, on top of
    existing gradients; equals the torch twin's accumulated gradients."""
    ref, m = _pair(kind, {}, n=24)
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(2, 3 + i, 24, generator=gen), torch.randn(2, 3 + i, 24, generator=gen)) for i in range(3)]
    start = {k: torch.randn(p.shape, generator=gen) for k, p in m.named_parameters()}
    for k, p in m.named_parameters():
        p.grad = start[k].clone()
    for k, p in ref.named_parameters():
        p.grad = start[k].clone()
    for x, dy in data:
        ref(x).backward(dy)
    with twobp.use_backend(backend):
        for i, (x, dy) in enumerate(data):
            with twobp.split_backward(microbatch=i):
                y = m(x)
            assert y.shape == x.shape
            y.backward(dy)
        assert twobp.pending_microbatches(m) == [0, 1, 2]
        twobp.backward_p2(m, microbatches=[1])
        assert twobp.pending_microbatches(m) == [0, 2]
        twobp.backward_p2(m)
    for (k, p), (_, r) in zip(m.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, r.grad.double(), name=f"d{k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_p2_equals_per_microbatch_p2(backend):
    _, a = _pair("layer", {})
    _, b = _pair("layer", {})
    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(3 + 5 * i, N, generator=gen), torch.randn(3 + 5 * i, N, generator=gen)) for i in range(4)]
    with twobp.use_backend(backend):
        for m, batched in ((a, True), (b, False)):
            for i, (x, dy) in enumerate(data):
                with twobp.split_backward(microbatch=i):
                    y = m(x)
                y.backward(dy)
            twobp.backward_p2(m, batched=batched)
    assert_close(a.weight.grad, b.weight.grad.double(), name="dgamma batched vs not")
    assert_close(a.bias.grad, b.bias.grad.double(), name="dbeta batched vs not")


@pytest.mark.parametrize("backend", BACKENDS)
def test_p2_into_fp32_grads_of_fp16_params(backend):
    ref, m = _pair("layer", {}, n=40, dtype=torch.float16)
    if hasattr(m.weight, "grad_dtype"):  # torch >= 2.10 checks .grad's dtype unless told otherwise
        m.weight.grad_dtype = m.bias.grad_dtype = torch.float32
    m.weight.grad = torch.randn(40)
    m.bias.grad = torch.randn(40)
    start_w, start_b = m.weight.grad.clone(), m.bias.grad.clone()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 40, generator=gen).half()
    dy = torch.randn(9, 40, generator=gen).half()
    _, _, g64 = _reference(ref, x, dy)
    with twobp.use_backend(backend):
        with twobp.split_backward(microbatch=0):
            y = m(x)
        y.backward(dy)
        twobp.backward_p2(m)
    assert m.weight.grad.dtype == torch.float32
    assert_close(m.weight.grad, start_w.double() + g64["weight"], torch.float16, name="dgamma")
    assert_close(m.bias.grad, start_b.double() + g64["bias"], torch.float16, name="dbeta")


def test_rms_eps_none_follows_torch_for_low_precision():
    """Tiny inputs, where eps dominates: the default eps must be torch's for that dtype."""
    ref, m = _pair("rms", {"elementwise_affine": False}, n=16, dtype=torch.float16)
    x = (torch.randn(4, 16, generator=torch.Generator().manual_seed(6)) * 1e-3).half()
    assert_close(m(x), ref(x).double(), torch.float16, name="Y with eps=None")


# ----------------------------------------------------------------------------------------
# what the store holds, and when it is freed
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_store_bytes_follow_the_lifetime(kind, backend):
    _, m = _pair(kind, {})
    store = twobp.default_store()
    x = torch.randn(10, N, requires_grad=True)
    stats = 10 * 4 * (2 if kind == "layer" else 1)  # fp32 μ and rstd per row (RMSNorm: rstd)
    eager = kind == "layer" and backend == "torch"
    with twobp.use_backend(backend):
        with twobp.split_backward(microbatch=0):
            y = m(x)
        # forward: p2 keeps x (the input's own storage, not a copy) and the row statistics;
        # LayerNorm on the torch backend reduces dγ/dβ in p1, so p2 keeps nothing until then
        # (p1's own set lives on the autograd node, as in plain autograd)
        assert store.live_bytes == (0 if eager else x.nbytes + stats)
        y.backward(torch.randn(10, N))
        if eager:
            # aten's one backward pass gives dγ and dβ with dX: p1 leaves their [N] fp32
            # partials and nothing else
            assert store.live_bytes == 2 * N * 4
        else:
            # p1 frees nothing of its own (p2 needs the same x and statistics) and adds dy
            assert store.live_bytes == 2 * x.nbytes + stats
            assert store.peak_bytes == store.live_bytes
        twobp.backward_p2(m)
    assert store.live_bytes == 0 and store.is_empty()


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_keeps_only_dy_for_dbeta(backend):
    ref, m = _pair("layer", {})
    m.weight.requires_grad_(False)
    store = twobp.default_store()
    x = torch.randn(10, N, requires_grad=True)
    dy = torch.randn(10, N)
    with twobp.use_backend(backend):
        with twobp.split_backward(microbatch=0):
            y = m(x)
        y.backward(dy)
        if backend == "torch":
            assert store.live_bytes == N * 4, "p1 reduced dβ = Σ dY to its [N] partial"
        else:
            assert store.live_bytes == dy.nbytes, "dβ = Σ dY needs neither x nor the statistics"
        twobp.backward_p2(m)
    _, dx64, g64 = _reference(ref, x, dy)
    assert m.weight.grad is None
    assert_close(m.bias.grad, g64["bias"], name="dbeta")
    assert_close(x.grad, dx64, name="dX")


def test_no_affine_queues_no_p2():
    _, m = _pair("rms", {"elementwise_affine": False})
    x = torch.randn(4, N, requires_grad=True)
    with twobp.split_backward(microbatch=0):
        y = m(x)
    assert twobp.default_store().is_empty(), "no parameter: nothing waits for p2"
    y.sum().backward()
    assert x.grad is not None and twobp.backward_p2(m) == 0


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bad_input_errors(name, backend):
    kind, kwargs = CONFIGS[name]
    _, m = _pair(kind, kwargs, n=8)
    with twobp.use_backend(backend):
        with pytest.raises(ValueError, match=r"last dim must be the normalized size 8, got input shape \(2, 7\)"):
            m(torch.randn(2, 7))
        if kwargs.get("elementwise_affine", True) and backend == "triton":
            with pytest.raises(TypeError, match="input dtype torch.float16 differs from weight dtype torch.float32"):
                m(torch.randn(2, 8, dtype=torch.float16))
        elif kwargs.get("elementwise_affine", True):  # as torch's CPU norms: half input, fp32 weights
            ref, _ = _pair(kind, kwargs, n=8)
            x = torch.randn(2, 8, dtype=torch.float16)
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's rms_norm warns that it cannot fuse
                want = ref(x)
            torch.testing.assert_close(m(x), want, rtol=2e-3, atol=2e-3)
        with pytest.raises(ValueError, match="at least 1 dim"):
            m(torch.tensor(1.0))


def test_triton_backend_names_the_hidden_size_limit():
    from twobp.kernels.norm import MAX_HIDDEN

    m = TwoBPRMSNorm(MAX_HIDDEN + 1, elementwise_affine=False)
    with twobp.use_backend("triton"), pytest.raises(ValueError, match="MAX_HIDDEN"):
        m(torch.zeros(1, MAX_HIDDEN + 1))


def test_layernorm_p2_mixes_partials_and_deferred_entries():
    """LayerNorm on the torch backend reduces dγ/dβ to partials in p1; on the Triton backend
    p2 reads x and dy. One batched p2 over entries of both kinds gives the summed gradient."""
    ref, m = _pair("layer", {})
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(6, N, generator=gen, requires_grad=True) for _ in range(3)]
    dys = [torch.randn(6, N, generator=gen) for _ in range(3)]
    for mb, (x, dy, backend) in enumerate(zip(xs, dys, ["torch", "triton", "torch"])):
        with twobp.use_backend(backend):
            with twobp.split_backward(microbatch=mb):
                y = m(x)
            y.backward(dy)
    with twobp.use_backend("torch"):
        assert twobp.backward_p2(m) == 3
    _, _, g64 = _reference(ref, torch.cat(xs), torch.cat(dys))
    assert_close(m.weight.grad, g64["weight"], name="dgamma")
    assert_close(m.bias.grad, g64["bias"], name="dbeta")
