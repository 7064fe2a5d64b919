"""TopKRouter against independent references (fresh random data every run)."""
import math

import pytest
import torch

from token_dispatcher.router import TopKRouter


def _x(T=64, H=16):
    return torch.randn(T, H)


def test_softmax_topk_matches_reference():
    T, H, E, K = 50, 16, 8, 3
    r = TopKRouter(H, E, K, score_func="softmax")
    x = _x(T, H)
    out = r(x)
    logits = x.double() @ r.weight.detach().double().T
    scores = torch.exp(logits - logits.max(1, keepdim=True).values)
    scores = scores / scores.sum(1, keepdim=True)
    order = torch.argsort(scores, dim=1, descending=True)[:, :K]
    assert out.idx_TK.dtype == torch.int64 and out.idx_TK.shape == (T, K)
    assert torch.equal(out.idx_TK.sort(1).values, order.sort(1).values)
    ref_p = scores.gather(1, out.idx_TK)
    torch.testing.assert_close(out.probs_TK.double(), ref_p, rtol=1e-5, atol=1e-7)
    assert out.probs_TK.dtype == torch.float32
    # Unnormalized softmax top-k: rows sum to less than 1.
    assert (out.probs_TK.sum(1) < 1).all()
    counts = torch.bincount(order.reshape(-1), minlength=E)
    assert torch.equal(out.tokens_per_expert_E, counts)


def test_norm_topk_prob_sums_to_one():
    r = TopKRouter(16, 8, 2, score_func="softmax", norm_topk_prob=True)
    p = r(_x()).probs_TK
    torch.testing.assert_close(p.sum(1), torch.ones(p.shape[0]))


def test_sigmoid_bias_steers_selection_not_probs():
    T, H, E, K = 40, 16, 8, 2
    r = TopKRouter(H, E, K, score_func="sigmoid", score_bias=True)
    x = _x(T, H)
    with torch.no_grad():
        r.expert_bias[5] = 10.0  # larger than any sigmoid gap: expert 5 always chosen
    out = r(x)
    assert (out.idx_TK == 5).any(1).all()
    sig = torch.sigmoid(x @ r.weight.detach().T)
    chosen = sig.gather(1, out.idx_TK)
    # Probs come from the unbiased scores, renormalized over the K chosen (sigmoid default).
    torch.testing.assert_close(out.probs_TK, chosen / chosen.sum(1, keepdim=True))
    # The other slot is the best unbiased expert other than 5.
    other = out.idx_TK[out.idx_TK != 5].view(T)
    masked = sig.clone()
    masked[:, 5] = -1
    assert torch.equal(other, masked.argmax(1))


def test_routing_map_is_the_same_decision_and_differentiable():
    T, H, E, K = 30, 12, 6, 2
    r = TopKRouter(H, E, K)
    out = r(_x(T, H))
    map_TE, probs_TE = out.routing_map()
    assert map_TE.dtype == torch.bool and map_TE.shape == (T, E)
    assert torch.equal(map_TE.sum(1), torch.full((T,), K))
    assert torch.equal(probs_TE != 0, map_TE)
    torch.testing.assert_close(probs_TE.gather(1, out.idx_TK), out.probs_TK)
    w = torch.randn(T, E)
    (probs_TE * w).sum().backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_aux_loss_matches_formula():
    T, H, E, K, c = 70, 16, 8, 2, 0.05
    for score_func in ("softmax", "sigmoid"):
        r = TopKRouter(H, E, K, score_func=score_func, aux_loss_coeff=c)
        x = _x(T, H)
        out = r(x)
        logits = x @ r.weight.detach().T
        s = torch.softmax(logits, 1) if score_func == "softmax" else torch.sigmoid(logits)
        s = s / s.sum(1, keepdim=True)
        ref = 0.0
        for e in range(E):
            f_e = (out.idx_TK == e).sum().item() / (T * K)
            ref += f_e * s[:, e].mean().item()
        assert out.aux_loss.item() == pytest.approx(c * E * ref, rel=1e-5)
    assert TopKRouter(H, E, K)(x).aux_loss.item() == 0.0


def test_aux_loss_gradient_balances_load():
    T, H, E, K = 256, 16, 8, 2
    r = TopKRouter(H, E, K, aux_loss_coeff=1.0)
    x = _x(T, H)
    with torch.no_grad():  # skew: every token prefers experts 0 and 1
        r.weight[:2] += 6 * x.mean(0) / x.mean(0).norm()
    def imbalance():
        c = r(x).tokens_per_expert_E.float()
        return (c.max() / c.mean()).item()
    before = imbalance()
    opt = torch.optim.SGD(r.parameters(), lr=2.0)
    for _ in range(300):
        opt.zero_grad()
        r(x).aux_loss.backward()
        opt.step()
    after = imbalance()
    assert before > 2.0 and after < 0.7 * before, (before, after)


def test_z_loss_matches_formula():
    T, H, E, c = 33, 16, 8, 1e-3
    r = TopKRouter(H, E, 2, z_loss_coeff=c)
    x = _x(T, H) * 5
    out = r(x)
    logits = (x.double() @ r.weight.detach().double().T)
    ref = c * (torch.log(torch.exp(logits).sum(1)) ** 2).mean()
    assert out.z_loss.item() == pytest.approx(ref.item(), rel=1e-5)
    out.z_loss.backward()
    assert r.weight.grad.abs().sum() > 0


def test_bias_update_balances_load_without_aux_loss():
    T, H, E, K = 512, 16, 8, 2
    r = TopKRouter(H, E, K, score_func="sigmoid", score_bias=True)
    x = _x(T, H)
    with torch.no_grad():
        r.weight[3] += 2 * x.mean(0) / x.mean(0).norm()
    def imbalance():
        c = r(x).tokens_per_expert_E.float()
        return (c.max() / c.mean()).item()
    before = imbalance()
    late = []
    for i in range(800):
        r.update_expert_bias(r(x).tokens_per_expert_E, rate=0.002)
        if i >= 780:  # sign updates end in a small limit cycle: average over it
            late.append(imbalance())
    assert r.expert_bias[3] < 0  # the overloaded expert was pushed down
    assert sum(late) / len(late) < 0.75 * before, (before, late)


def test_update_bias_direction_and_errors():
    r = TopKRouter(4, 4, 1, score_bias=True)
    r.update_expert_bias(torch.tensor([10, 0, 5, 5]), rate=0.1)
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    with pytest.raises(RuntimeError, match="score_bias=True"):
        TopKRouter(4, 4, 1).update_expert_bias(torch.zeros(4), 0.1)
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(4, 4, 5)
    with pytest.raises(ValueError, match="score_func"):
        TopKRouter(4, 4, 1, score_func="relu")


def test_empty_batch():
    out = TopKRouter(8, 4, 2, aux_loss_coeff=0.1, z_loss_coeff=0.1)(torch.zeros(0, 8))
    assert out.idx_TK.shape == (0, 2) and out.aux_loss.item() == 0.0
    assert math.isfinite(out.z_loss.item())
