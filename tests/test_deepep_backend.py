"""The deepep / uccl / hybridep adapters: sizing math, options, availability, and parity on
real gloo ranks with CPU stand-ins of the libraries (tests/fake_ep.py). The libraries
themselves are proven on GPUs by tests/test_gpu_backends.py."""
import pytest
import torch

from moe_dispatch import available_backends
from moe_dispatch.protocol import BackendConfig
from moe_dispatch.registry import BackendUnavailableError, get_backend_class
from moe_dispatch.testing import make_case, reference_dispatch, reference_moe, rel_err
from moe_dispatch.backends.deepep.buffer import (check_group_size, library_for_module, nvl_size_hint,
                                    DEEP_EP, UCCL)

from test_dispatch_parity import _check


# ------------------------------------------------------------------ sizing math


def _hand_hint(num_sms, recv, hidden_bytes, R, nvshmem):
    ch, nvl, rdma = num_sms // 2, min(R, 8), max(R // 8, 1)
    slots = ch * nvl * recv
    n = ch * nvl * (2 * rdma + 3) * 4 + slots * (hidden_bytes + 128 * 8 + 128 * 4 + 128 * 4)
    n += slots * 8 if nvshmem else 0
    return (n + 127) // 128 * 128


def test_nvl_hint_deepep_benchmark_shape():
    # EP4, hidden 7168 BF16, DeepEP's default 20 SMs and 256-token NVL ring:
    # 10 channels x 4 peers x 256 slots x (14336 + 1024 + 512 + 512) bytes + heads.
    assert nvl_size_hint(20, 256, 7168 * 2, 4) == 167_773_056
    assert nvl_size_hint(20, 256, 7168 * 2, 4) == _hand_hint(20, 256, 14336, 4, False)


@pytest.mark.parametrize("R", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("sms", [2, 20, 24, 132])
@pytest.mark.parametrize("hb", [256, 4096, 14336])
def test_nvl_hint_formula(R, sms, hb):
    for nvshmem in (False, True):
        got = nvl_size_hint(sms, 256, hb, R, nvshmem)
        assert got == _hand_hint(sms, 256, hb, R, nvshmem)
        assert got % 128 == 0


def test_nvl_hint_monotone():
    base = nvl_size_hint(20, 256, 4096, 4)
    assert nvl_size_hint(24, 256, 4096, 4) > base          # more channels
    assert nvl_size_hint(20, 256, 8192, 4) > base          # wider rows
    assert nvl_size_hint(20, 256, 4096, 8) > base          # more peers
    # beyond 8 ranks the NVLink part stops growing (the rest goes over RDMA)
    assert nvl_size_hint(20, 256, 4096, 16) == nvl_size_hint(20, 256, 4096, 8) + 10 * 8 * 2 * 4


def test_group_size_rules():
    for R in (2, 4, 8):
        check_group_size(R, rdma=False, library="deep_ep")
    check_group_size(16, rdma=True, library="deep_ep")
    with pytest.raises(ValueError, match="NVSHMEM"):
        check_group_size(16, rdma=False, library="deep_ep")
    for R in (3, 6, 12):
        with pytest.raises(ValueError, match="EP sizes"):
            check_group_size(R, rdma=True, library="deep_ep")


# ------------------------------------------------------------------ availability, options


def test_availability_reasons_name_what_to_install():
    import importlib.util
    av = available_backends()
    if importlib.util.find_spec("deep_ep") is None:
        for name in ("deepep", "hybridep"):
            assert av[name] != "available"
            assert "\n" not in av[name]
            assert "install" in av[name] and "DeepEP" in av[name]
        assert "hybrid-ep" in av["hybridep"]
        assert "v1.2.1" in av["deepep"]
        with pytest.raises(BackendUnavailableError, match="deepep"):
            get_backend_class("deepep")
    if importlib.util.find_spec("uccl") is None:
        assert av["uccl"] != "available" and "\n" not in av["uccl"]
        assert "uccl" in av["uccl"] and "install" in av["uccl"]
        # never DeepEP in disguise: the reason is about UCCL even if deep_ep were present
        assert "deep_ep" not in av["uccl"].split(";")[0]


def test_uccl_library_is_not_deep_ep():
    assert UCCL.name == "uccl" and all(c.startswith("uccl") for c in UCCL.candidates)
    assert library_for_module("deep_ep") is DEEP_EP
    other = library_for_module("my_v1_lib")
    assert other.name == "my_v1_lib" and other.candidates == ("my_v1_lib",)


def _make(backend_cls, options, E=8):
    return backend_cls(BackendConfig(group=None, num_experts=E, options=options))


def test_option_validation_single_process():
    # One rank needs no library: options are still validated.
    from moe_dispatch.backends.deepep import DeepEPBackend
    from moe_dispatch.backends.hybridep import HybridEPBackend
    from moe_dispatch.backends.uccl import UCCLBackend
    with pytest.raises(ValueError, match="unknown backend_options"):
        _make(DeepEPBackend, {"nmu_sms": 20})
    with pytest.raises(ValueError, match="even"):
        _make(DeepEPBackend, {"num_sms": 21})
    with pytest.raises(ValueError, match="async_finish"):
        _make(DeepEPBackend, {"allocate_on_comm_stream": True})
    with pytest.raises(ValueError, match="unknown backend_options"):
        _make(DeepEPBackend, {"buffer_module": "deep_ep"})  # only the uccl adapter takes it
    _make(UCCLBackend, {"buffer_module": "deep_ep", "num_sms": 24})
    with pytest.raises(ValueError, match="multiple of pad_multiple"):
        HybridEPBackend(BackendConfig(None, 8, pad_multiple=16, options={"num_permuted_tokens": 40}))
    with pytest.raises(ValueError, match="requires num_permuted_tokens"):
        _make(HybridEPBackend, {"tokens_per_rank": 64})
    # Budget mode (max_rows_per_rank): its token cap is a budget-mode option, and HybridEP's
    # row count is the budget itself.
    with pytest.raises(ValueError, match="budget mode only"):
        _make(DeepEPBackend, {"max_tokens_per_rank": 64})
    with pytest.raises(ValueError, match="leave the option unset"):
        HybridEPBackend(BackendConfig(None, 8, options={"num_permuted_tokens": 32},
                                      max_rows_per_rank=32))


@pytest.mark.parametrize("name", ["deepep", "uccl", "hybridep"])
def test_single_rank_is_local_permutation(name):
    """With one rank nothing is communicated: the backend equals the dense reference."""
    from moe_dispatch.registry import _load
    from moe_dispatch.routing import canonicalize
    cls = _load(name)
    case = make_case(1, [13], 16, 6, 2, mask_frac=0.2)
    be = cls(BackendConfig(group=None, num_experts=6, pad_multiple=4))
    x = case.xs[0].clone().requires_grad_(True)
    p = case.probs[0].clone().requires_grad_(True)
    x_TH, idx, probs, check = canonicalize(x, 6, topk_idx=case.idxs[0], topk_probs=p)
    res = be.dispatch(x_TH, idx, probs, check)
    tok, tpe, pr = reference_dispatch(case, 0, 4)
    assert torch.equal(res.tokens_per_expert_L, tpe)
    assert torch.equal(res.tokens_NH, tok) and torch.equal(res.probs_N, pr)
    from moe_dispatch.testing import local_experts
    y = be.combine(local_experts(case.W, 0)(res.tokens_NH, res.tokens_per_expert_L, res.probs_N),
                   res.handle)
    (y * case.gouts[0]).sum().backward()
    ys, gx, gp = reference_moe(case)
    assert rel_err(y, ys[0]) < 1e-5 and rel_err(x.grad, gx[0]) < 1e-5
    assert rel_err(p.grad, gp[0]) < 1e-5


# ------------------------------------------------------------------ multi-rank with stand-ins

SCENARIOS = {
    "uneven": (lambda R: [6 + 5 * r for r in range(R)], dict(mask_frac=0.2), {}),
    "masked_garbage_probs": (lambda R: [9] * R, dict(mask_frac=0.3, masked_prob=0.7), {}),
    "zero_token_rank": (lambda R: [0] + [9] * (R - 1), dict(mask_frac=0.1), {}),
    "skew_one_expert": (lambda R: [10] * R, dict(skew="one_expert"), {}),
    "zipf_pad": (lambda R: [12] * R, dict(skew="zipf"), {"pad_multiple": 4}),
    "dense_zero_rank": (lambda R: [0] + [7] * (R - 1), dict(), {"form": "dense"}),
    "all_empty": (lambda R: [0] * R, dict(), {}),
}


def _bf16_case(R, name, seed):
    tokens, kw, opts = SCENARIOS[name]
    kw = dict(kw)
    topk = kw.pop("topk", 3)
    case = make_case(R, tokens(R), 16, 4 * R, topk, seed=seed, dtype=torch.bfloat16, **kw)
    # The test expert runs in BF16 too; the reference in float64 from the same BF16 values.
    return case, opts


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend,extra", [
    ("deepep", {}),
    ("deepep", {"backend_options": {"num_sms": 24, "async_finish": True,
                                    "allocate_on_comm_stream": True}}),
    ("uccl", {}),
    ("hybridep", {}),
])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_parity_with_standins(gloo_pool, world, backend, extra, scenario):
    if world == 4 and scenario in ("all_empty", "dense_zero_rank") and extra:
        pytest.skip("covered at world 2")
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
    case, opts = _bf16_case(world, scenario, seed)
    opts = {**opts, **extra}
    res = gloo_pool(world).run("ep_workers", "fake_parity", case, backend, opts)
    _check(res, case, opts, tol=3e-2)
    if backend == "uccl":
        assert res[0]["log"]["uccl_intranode"] is True  # one host: NVLink-only buffer
    if backend in ("deepep", "uccl") and any(res[0]["log"].values()):
        assert res[0]["log"]["built"] <= 1


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scenario", ["uneven", "zero_token_rank", "zipf_pad", "dense_zero_rank"])
def test_hybridep_parity_2eec484_api(gloo_pool, world, scenario):
    """The older hybrid-ep API (use_host_meta, 8-field handle, pad_multiple required, token
    chunk and hidden-size rules enforced by the stand-in)."""
    if world == 4 and scenario == "dense_zero_rank":
        pytest.skip("covered at world 2")
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
    case, opts = _bf16_case(world, scenario, seed)
    res = gloo_pool(world).run("ep_workers", "fake_parity", case, "hybridep", opts, "2eec484")
    _check(res, case, opts, tol=3e-2)
    for out in res:
        assert out["tpe"].device.type == "cpu" and out["tpe"].dtype == torch.int64


@pytest.mark.parametrize("api", ["current", "2eec484"])
def test_hybridep_unrouted_tokens_are_zero(gloo_pool, api):
    """Tokens with every slot masked are left unwritten by HybridEP's combine (garbage, NaN
    in the stand-in): the backend must return zeros for them, and zero grads."""
    world = 2
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
    case = make_case(world, [9, 7], 16, 4 * world, 3, seed=seed, dtype=torch.bfloat16,
                     mask_frac=0.2)
    for r in range(world):
        case.idxs[r][:3] = -1  # three tokens routed nowhere on every rank
    res = gloo_pool(world).run("ep_workers", "fake_parity", case, "hybridep", {}, api)
    _check(res, case, {}, tol=3e-2)
    for out in res:
        assert torch.isfinite(out["y"].float()).all() and torch.isfinite(out["gx"].float()).all()
        assert (out["y"].reshape(-1, 16)[:3] == 0).all() and (out["gx"][:3] == 0).all()


def test_parity_deepep_fp32_input_roundtrips_via_bf16(gloo_pool):
    case = make_case(2, [7, 5], 16, 8, 2, seed=3)
    res = gloo_pool(2).run("ep_workers", "fake_parity", case, "deepep", {})
    ys, gx, _ = reference_moe(case)
    for r in range(2):
        assert res[r]["y"].dtype == torch.float32
        assert rel_err(res[r]["y"], ys[r]) < 3e-2
        assert rel_err(res[r]["gx"], gx[r]) < 3e-2


def test_seed_fused_api_roundtrip(gloo_pool):
    T, H, E, K = 11, 16, 8, 3
    res = gloo_pool(2).run("ep_workers", "fake_fused_api", T, H, E, K, 7)
    for r, out in enumerate(res):
        # combine(2 * dispatch(x)) = 2 * x * (number of ranks the token reached)
        want = (out["x"].float() * 2 * out["n_ranks"].unsqueeze(1)).to(torch.bfloat16)
        assert torch.equal(out["y"], want)
        assert out["none"] is None and out["buffer_set"] and out["buffer_after_free"] is None
        assert out["tpe"].device.type == "cpu" and out["tpe"].dtype == torch.int64
        # d loss / d x = 2 * arange(H) per reached rank; d loss / d p = 2 p on the slot's rank
        want_gx = 2 * torch.arange(H).float() * out["n_ranks"].unsqueeze(1).float()
        assert torch.allclose(out["gx"].float(), want_gx, rtol=1e-2)
        want_gp = torch.where(out["idx"] >= 0, 2 * out["p"], 0.0)
        assert torch.allclose(out["gp"], want_gp, atol=1e-6)
        assert out["log"]["destroyed"] == out["log"]["built"] == 1
    assert int(sum(o["tpe"].sum() for o in res)) == sum(
        int((o["idx"] >= 0).sum()) for o in res)


def test_buffer_growth_and_free(gloo_pool):
    res = gloo_pool(2).run("ep_workers", "fake_buffer_growth")
    for out in res:
        assert out["same"] and out["grew"] and out["nvl2"] > out["nvl1"]
        assert out["old_destroyed"] and out["global_is_new"] and out["grew_for_sms"]
        assert out["after_free"] is None
        assert out["log"]["built"] == out["log"]["destroyed"] == 3


@pytest.mark.parametrize("pad,npt", [(None, None), (4, None), (None, 64)])
def test_seed_hybrid_api_roundtrip(gloo_pool, pad, npt):
    world, T, H, E = 2, 12, 16, 8
    res = gloo_pool(world).run("ep_workers", "fake_hybrid_api", T, H, E, pad, npt)
    for out in res:
        # combine(3 * dispatch(x)) = 3 * x * (number of experts the token was routed to)
        n = out["rm"].sum(1, keepdim=True).float()
        assert torch.allclose(out["y"].float(), out["x"].float() * 3 * n, rtol=2e-2)
        assert torch.allclose(out["gx"].float(), 3 * n.expand(-1, H), rtol=2e-2)
        assert torch.allclose(out["gp"], torch.where(out["rm"], 2 * out["pr"], 0.0), atol=1e-6)
        if npt:
            assert out["tok_rows"] == npt and out["overflow"] == 0
        else:
            assert out["tok_rows"] == int(out["tpe"].sum())
        if pad:
            assert all(int(c) % pad == 0 for c in out["tpe"])
        assert out["buffer_set"] and out["after_reset"] is None


def test_hybridep_overflow_flag_surfaces(gloo_pool):
    case = make_case(2, [16, 16], 16, 8, 4, seed=5)
    res = gloo_pool(2).run("ep_workers", "fake_hybrid_overflow", case, 8)
    assert all(r["rows"] == 8 for r in res)
    assert all(r["overflowed"] for r in res)  # 16 tokens x 4 slots over 2 ranks >> 8 rows


# ------------------------------------------------------------------ validation without a sync

BAD_AFTER_WARMUP = ["expert_too_big", "expert_below_minus_one", "nan_prob", "negative_prob",
                    "idx_shape", "neither_form", "int_hidden", "hidden_size", "dense_nan"]
_MESSAGES = {"expert_too_big": "expert id", "expert_below_minus_one": "expert id",
             "nan_prob": "NaN", "negative_prob": "negative", "idx_shape": "topk_idx must be",
             "neither_form": "give (topk_idx", "int_hidden": "floating",
             "hidden_size": "hidden size", "dense_nan": "NaN"}


def _case(R, seed, hidden=16, topk=3, tokens=None, **kw):
    return make_case(R, tokens or [6 + 3 * r for r in range(R)], hidden, 4 * R, topk, seed=seed,
                     dtype=torch.bfloat16, **kw)


def _seed():
    return int(torch.randint(0, 2 ** 31 - 1, (1,)))


def _oks(res, i):
    """Every rank's outputs of step ``i`` (which must have succeeded)."""
    for rank, r in enumerate(res):
        assert r[i][0] == "ok", f"step {i} rank {rank}: {r[i]}"
    return [r[i][1] for r in res]


@pytest.mark.parametrize("backend", ["deepep", "uccl"])
def test_warm_dispatch_needs_no_agreement(gloo_pool, backend):
    """After the first call, same-shape calls (also a zero-token rank, dense routing with a
    narrower K, skew) run without the validation exchange and match the reference."""
    R = 2
    s = _seed()
    steps = [(_case(R, s), {}, None, None),
             (_case(R, s + 1, mask_frac=0.3), {}, None, None),
             (_case(R, s + 2, tokens=[0, 9]), {}, None, None),
             (_case(R, s + 3, tokens=[0, 7]), {"form": "dense"}, None, None),
             (_case(R, s + 4, skew="zipf"), {}, None, None)]
    res = gloo_pool(R).run("ep_workers", "fake_steps", backend, steps)
    for i, (case, opts, _, _) in enumerate(steps):
        _check(_oks(res, i), case, opts, tol=3e-2, exact_rows=False)
        assert [r[i][2] for r in res] == ([1] * R if i == 0 else [0] * R), (i, res[0][i])


@pytest.mark.parametrize("which", BAD_AFTER_WARMUP)
def test_bad_input_after_warmup_raises_everywhere(gloo_pool, which):
    """A bad rank in a warm (sync-free) dispatch: every rank raises, none hangs, the rank
    names its own error, and the next dispatch works without an exchange."""
    R = 2
    s = _seed()
    steps = [(_case(R, s), {}, None, None), (_case(R, s + 1), {}, which, 1),
             (_case(R, s + 2), {}, None, None)]
    res = gloo_pool(R).run("ep_workers", "fake_steps", "deepep", steps)
    for rank in range(R):
        st = res[rank][1]
        assert st[0] == "err" and st[1] == "DispatchInputError", (rank, st)
        assert st[3] == 1  # exactly one exchange, after the flag was seen
    assert _MESSAGES[which] in res[1][1][2], res[1][1][2]
    assert "EP rank(s) [1]" in res[0][1][2] or (which == "hidden_size"
                                                 and "hidden size" in res[0][1][2])
    _check(_oks(res, 2), steps[2][0], {}, tol=3e-2, exact_rows=False)
    assert all(r[2][2] == 0 for r in res)


def test_shape_change_renegotiates(gloo_pool):
    """New hidden size on every rank, or a wider top-k on one rank only: valid, the
    dispatch is redone in the newly agreed shape; later calls are sync-free again."""
    R = 2
    s = _seed()
    steps = [(_case(R, s), {}, None, None),
             (_case(R, s + 1, hidden=32), {}, None, None),     # every rank: H 16 -> 32
             (_case(R, s + 2, hidden=32), {}, "wider_k", 0),   # rank 0: K 3 -> 4
             (_case(R, s + 3, hidden=32), {}, None, None)]     # K 3 fits the agreed 4
    res = gloo_pool(R).run("ep_workers", "fake_steps", "deepep", steps)
    for i, (case, opts, _, _) in enumerate(steps):
        _check(_oks(res, i), case, opts, tol=3e-2, exact_rows=False)
    assert [res[0][i][2] for i in range(4)] == [1, 1, 1, 0]


def test_real_counts_in_flag_range_are_kept(gloo_pool):
    """If real per-expert counts reach the flag offset (forced small here), the ranks agree
    once, find nothing wrong and keep the dispatched rows."""
    R = 2
    s = _seed()
    steps = [(_case(R, s), {}, None, None), (_case(R, s + 1, tokens=[12, 12]), {}, None, None)]
    res = gloo_pool(R).run("ep_workers", "fake_steps", "deepep", steps, 2)
    for i, (case, opts, _, _) in enumerate(steps):
        _check(_oks(res, i), case, opts, tol=3e-2, exact_rows=False)
    assert [r[1][2] for r in res] == [1, 1]


def test_flag_offset_leaves_room():
    from moe_dispatch.backends.deepep.buffer import flag_offset, is_flagged
    for R in (2, 4, 8, 16, 64, 256):
        off = flag_offset(R)
        assert R * off + 2 ** 30 < 2 ** 31  # every rank flagging + real counts fit int32
        assert off >= 2 ** 22 - 1  # real counts below this never look flagged
        assert is_flagged([0, off], R) and not is_flagged([off - 1, 0], R)


# ------------------------------------------------------------------ UCCL's Python Buffer by path


def test_uccl_module_from_env(tmp_path, monkeypatch):
    """$MOE_DISPATCH_UCCL_MODULE names UCCL's Python Buffer package (a directory or a
    module); nothing else is tried then, and never deep_ep."""
    import sys
    from moe_dispatch.backends.deepep.buffer import UCCL, UCCL_MODULE_ENV
    pkg = tmp_path / "my_uccl_wrapper"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .buffer import Buffer\n")
    (pkg / "buffer.py").write_text(
        "class Buffer:\n"
        "    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, is_intranode=None):\n"
        "        pass\n" + "".join(f"    def {m}(self): pass\n" for m in (
            "get_dispatch_layout", "dispatch", "combine", "get_dispatch_config",
            "get_combine_config", "set_num_sms", "capture")))
    monkeypatch.setenv(UCCL_MODULE_ENV, str(pkg))
    try:
        cls = UCCL.load()
        assert cls.__module__ == "my_uccl_wrapper.buffer" and UCCL.reason() is None
        from moe_dispatch.backends.deepep.buffer import V1BufferManager
        assert V1BufferManager(UCCL, cls, None).takes_intranode
        monkeypatch.setenv(UCCL_MODULE_ENV, str(tmp_path / "missing_pkg"))
        r = UCCL.reason()
        assert r is not None and "missing_pkg" in r and UCCL_MODULE_ENV in r
        assert "deep_ep" not in r.split(";")[0]
        monkeypatch.setenv(UCCL_MODULE_ENV, "no_such_uccl_module")
        assert "no_such_uccl_module" in UCCL.reason()
    finally:
        for name in [n for n in sys.modules if n.startswith("my_uccl_wrapper")]:
            sys.modules.pop(name)


def test_small_hidden_is_refused_on_every_rank(gloo_pool):
    # DeepEP V1 returned wrong combine sums for H=64 rows on GPUs: such sizes must raise.
    case = make_case(2, [5, 7], hidden=64, num_experts=8, topk=2)
    res = gloo_pool(2).run_raw("ep_workers", "fake_small_rows", case, timeout=60)
    for r in res:
        assert r[0] == "err" and r[1] == "ValueError" and "below 256" in r[2], r
