"""GroupedExperts and MoELayer (single process) against per-row references."""
import pytest
import torch
import torch.nn.functional as F

from token_dispatcher import MoETokenDispatcher
from token_dispatcher.experts import GroupedExperts, grouped_mm_fn
from token_dispatcher.layer import MoELayer


def _rows(counts, H):
    N = sum(counts)
    x = torch.randn(N, H, requires_grad=True)
    p = torch.rand(N, requires_grad=True)
    return x, torch.tensor(counts, dtype=torch.int64), p


def _reference(ex, x, counts, p):
    """Each row through its own expert's SwiGLU, one row at a time."""
    out, e_of_row = [], torch.repeat_interleave(torch.arange(len(counts)), counts)
    for n in range(x.shape[0]):
        e = int(e_of_row[n])
        h = F.silu(x[n] @ ex.w1[e]) * (x[n] @ ex.w3[e])
        out.append((h @ ex.w2[e]) * p[n])
    return torch.stack(out) if out else x.new_zeros(0, ex.hidden)


def _grads(mod, *inputs):
    return [t.grad.clone() for t in list(mod.parameters()) + list(inputs)]


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 7, 0], [4, 4, 4, 4]])
def test_loop_matches_per_row_reference(counts):
    H, Fh = 12, 20
    ex = GroupedExperts(len(counts), H, Fh, impl="loop", init_std=0.3)
    x, c, p = _rows(counts, H)
    g = torch.randn(sum(counts), H)
    (ex(x, c, p) * g).sum().backward()
    got = _grads(ex, x, p)
    y = ex(x, c, p)
    for t in list(ex.parameters()) + [x, p]:
        t.grad = None
    y_ref = _reference(ex, x, c, p)
    # float32 in another summation order (fresh random data: 1e-5 failed once in ~1000)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    (y_ref * g).sum().backward()
    for a, b in zip(got, _grads(ex, x, p)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _cpu_grouped_mm_works():
    gmm = grouped_mm_fn()
    if gmm is None:
        return False
    try:
        a = torch.randn(4, 8, requires_grad=True)
        b = torch.randn(2, 8, 8, requires_grad=True)
        gmm(a, b, offs=torch.tensor([1, 4], dtype=torch.int32)).backward(torch.ones(4, 8))
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _cpu_grouped_mm_works(), reason="this torch has no CPU grouped_mm")
def test_grouped_mm_path_matches_loop():
    """The grouped_mm code path (offsets, operand layout) checked on torch's CPU kernel."""
    H, Fh, counts = 16, 24, [5, 0, 9, 2, 0, 1]
    ex = GroupedExperts(len(counts), H, Fh, impl="grouped_mm", init_std=0.3)
    x, c, p = _rows(counts, H)
    g = torch.randn(sum(counts), H)
    y_g = ex(x, c, p)
    (y_g * g).sum().backward()
    got = _grads(ex, x, p)
    for t in list(ex.parameters()) + [x, p]:
        t.grad = None
    ex.impl = "loop"
    y_l = ex(x, c, p)
    (y_l * g).sum().backward()
    torch.testing.assert_close(y_g, y_l, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, _grads(ex, x, p)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for w in (ex.w1, ex.w2, ex.w3):  # empty experts: exact zero grads
        assert torch.count_nonzero(w.grad[1]) == 0 and torch.count_nonzero(w.grad[4]) == 0


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_zero_row_experts_get_zero_grads(impl):
    if impl == "grouped_mm" and not _cpu_grouped_mm_works():
        pytest.skip("this torch has no CPU grouped_mm")
    H, Fh = 8, 16
    ex = GroupedExperts(4, H, Fh, impl=impl)
    x, c, p = _rows([0, 6, 0, 2], H)
    ex(x, c, p).square().sum().backward()
    for w in (ex.w1, ex.w2, ex.w3):
        assert w.grad is not None
        assert torch.count_nonzero(w.grad[0]) == 0 and torch.count_nonzero(w.grad[2]) == 0
        assert torch.count_nonzero(w.grad[1]) > 0 and torch.count_nonzero(w.grad[3]) > 0
    # No rows at all (a rank that received nothing): output [0, H], grads all zero, not None.
    ex.zero_grad(set_to_none=True)
    x0 = torch.zeros(0, H, requires_grad=True)
    y0 = ex(x0, torch.zeros(4, dtype=torch.int64), torch.zeros(0))
    assert y0.shape == (0, H)
    y0.sum().backward()
    for w in (ex.w1, ex.w2, ex.w3):
        assert w.grad is not None and torch.count_nonzero(w.grad) == 0


def test_local_slice_equals_global_slice():
    full = GroupedExperts(8, 16, 24, seed=7, layer_id=3)
    part = GroupedExperts(8, 16, 24, num_local_experts=2, local_expert_offset=4, seed=7,
                          layer_id=3)
    for a, b in ((full.w1, part.w1), (full.w2, part.w2), (full.w3, part.w3)):
        assert torch.equal(a[4:6], b)
    other = GroupedExperts(8, 16, 24, seed=8, layer_id=3)
    assert not torch.equal(other.w1, full.w1)


def test_probs_scale_rows_and_none_is_unweighted():
    ex = GroupedExperts(2, 8, 8, impl="loop", init_std=0.3)
    x, c, _ = _rows([3, 2], 8)
    p = torch.rand(5)
    torch.testing.assert_close(ex(x, c, p), ex(x, c, None) * p[:, None])


def test_auto_impl_choice():
    ex = GroupedExperts(2, 8, 8)
    assert ex.resolved_impl(torch.zeros(1, 8)) == "loop"  # CPU
    assert ex.resolved_impl(torch.zeros(1, 8, dtype=torch.bfloat16)) == "loop"
    ex.impl = "grouped_mm"
    assert ex.resolved_impl(torch.zeros(1, 8)) == "grouped_mm"


def test_bad_counts_raise():
    ex = GroupedExperts(4, 8, 8, impl="loop")
    with pytest.raises(ValueError, match="entries"):
        ex(torch.zeros(3, 8), torch.tensor([3]), None)
    with pytest.raises(ValueError, match="sums to"):
        ex(torch.zeros(3, 8), torch.tensor([2, 1, 1, 0]), None)
    # Budget mode: rows past the experts' blocks are unused and come back as zeros.
    y = ex(torch.randn(3, 8), torch.tensor([1, 1, 0, 0]), None)
    assert y.shape == (3, 8) and not y[2].any() and y[:2].abs().sum() > 0
    with pytest.raises(ValueError, match="impl"):
        GroupedExperts(4, 8, 8, impl="fast")


@pytest.mark.parametrize("shared", [0, 24])
def test_moe_layer_matches_dense_reference(shared):
    """Router + dispatcher + experts (+ shared expert) against a per-token recomputation."""
    T, H, Fh, E, K = 40, 16, 24, 6, 2
    layer = MoELayer(H, Fh, E, K, dispatcher=MoETokenDispatcher(E), shared_expert_hidden=shared,
                     router_kwargs=dict(aux_loss_coeff=0.01), init_std=0.3)
    x = torch.randn(2, T // 2, H, requires_grad=True)
    out = layer(x)
    assert out.output.shape == x.shape
    r = layer.router(x.reshape(T, H))
    ex = layer.experts
    ref = []
    for t in range(T):
        xt = x.reshape(T, H)[t]
        acc = torch.zeros(H)
        for k in range(K):
            e = int(r.idx_TK[t, k])
            acc = acc + (F.silu(xt @ ex.w1[e]) * (xt @ ex.w3[e])) @ ex.w2[e] * r.probs_TK[t, k]
        if shared:
            acc = acc + layer.shared_expert(xt)
        ref.append(acc)
    ref = torch.stack(ref).reshape(x.shape)
    torch.testing.assert_close(out.output, ref, rtol=1e-5, atol=1e-6)
    assert out.aux_loss.item() > 0
    assert torch.equal(out.tokens_per_expert_E, r.tokens_per_expert_E)
    g = torch.randn_like(ref)
    gx = torch.autograd.grad((out.output * g).sum(), [x, layer.router.weight])
    gx_ref = torch.autograd.grad((ref * g).sum(), [x, layer.router.weight])
    for a, b in zip(gx, gx_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
