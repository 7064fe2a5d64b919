"""FP8 on the wire (``MoETokenDispatcher(wire_dtype=torch.float8_e4m3fn)``).

* The format: Triton quantise / dequantising scatter (under TRITON_INTERPRET=1 on CPU, for
  real on a GPU) against the plain torch reference, bit for bit; the error bound README
  states.
* alltoall and allgather, exact and budget modes, real gloo ranks (2 and 4): dispatched rows
  equal the single-process reference of dequant(quant(x)) exactly; combine and both
  gradients equal the plain path run on dequant(quant(x)) (the straight-through
  reference) and the dense float64 reference; tokens_fp8 / scales are the quantised rows.
* Errors: hidden not a multiple of 128 raises on every rank; bad input in the budget mode
  raises at ``check_status`` on every rank; a wire_dtype that differs across ranks, or a
  backend that cannot move FP8 rows, raises at construction.
* moe-train's ``wire_dtype: fp8``.
"""
import dataclasses

import pytest
import torch

# First: sets TRITON_INTERPRET on CPU machines before the kernels are defined.
from triton_mode import DEV, HAS_TRITON, needs_triton  # noqa: E402,F401

from moe_dispatch import kernels, registry  # noqa: E402
from moe_dispatch.backends import wire  # noqa: E402
from moe_dispatch.kernels import fp8  # noqa: E402
from moe_dispatch.permute import budget_plan, group_plan  # noqa: E402
from moe_dispatch.protocol import STATUS_ROWS_DROPPED, BackendConfig  # noqa: E402
from moe_dispatch.testing import make_case, reference_dispatch, reference_moe, rel_err  # noqa: E402
from token_dispatcher import MoETokenDispatcher  # noqa: E402

E4M3 = torch.float8_e4m3fn
BACKENDS = ["alltoall", "allgather"]


def _x(T, H, dtype, g):
    """Rows spanning 11 decades, with an all-zero block, a -0.0, a block far below the row's
    other blocks, and one near the float32 floor."""
    x = torch.randn(T, H, generator=g) * torch.logspace(-8, 3, T).unsqueeze(1)
    x[0, :128] = 0
    x[1, 5] = -0.0
    if T > 2:
        x[2, :128] *= 1e-6
        x[T - 1, -128:] *= 1e-30
    return x.to(dtype)


# ===================================================================== the format


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [384, 1024])
def test_quantize_kernel_matches_reference(dtype, H):
    from moe_dispatch.kernels import _fp8
    g = torch.Generator().manual_seed(H)
    x = _x(7, H, dtype, g)
    if dtype == torch.float16:
        x[torch.isinf(x)] = 0  # fp16 cannot hold the largest rows
    q_ref, s_ref = fp8.quantize_reference(x)
    x = x.to(DEV)
    q = torch.full((7, H), 0xAB, dtype=torch.uint8, device=DEV)
    s = torch.full((7, H // 128), float("nan"), device=DEV)
    _fp8.quantize(x, q, s)
    assert torch.equal(q.cpu(), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
    # The packed wire row: the same bytes and scales, side by side.
    if DEV.type == "cuda":
        packed = fp8.quantize_packed(x).cpu()
    else:
        packed = torch.empty(7, fp8.packed_width(H), dtype=torch.uint8)
        _fp8.quantize(x, *(t.view(torch.uint8) if t.dtype == E4M3 else t
                           for t in fp8.unpack(packed, H)))
    assert torch.equal(packed, fp8.pack(q_ref, s_ref))


def _bench_sweep():
    """The quantise tiles benchmarks/scripts/fp8_kernels.py --sweep quant times on a GPU."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "scripts" / "fp8_kernels.py"
    spec = importlib.util.spec_from_file_location("fp8_kernels_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.QUANT_SWEEP.split(",")


# Every tile the GPU sweep times and a few edge ones: one-row, multi-row, flat (tiles spanning
# rows, tiles wider than a row), persistent with and without prefetch, cache hints.
QUANT_TILES = ["64:4"] + _bench_sweep() + ["64:4:p4", "1:1", "2:2:4", "1:4:2:p1:pf",
                                           "2:2:flat:p1:pf:ev"]


@needs_triton
@pytest.mark.parametrize("tile", QUANT_TILES)
def test_quantize_tiles_match_reference(tile):
    """Every launch configuration writes the reference's bytes: separate tensors and packed
    wire rows; rows and blocks not a multiple of any tile (T 7, G 3 / 8); the GPU variant
    (SOFT=False) launched too, so the sm_90 compile check covers it, compared on a GPU."""
    from moe_dispatch.kernels import _fp8
    g = torch.Generator().manual_seed(5)
    for T, H in [(7, 384), (7, 1024)]:
        x = _x(T, H, torch.bfloat16, g)
        q_ref, s_ref = fp8.quantize_reference(x)
        x = x.to(DEV)
        packed = torch.full((T, fp8.packed_width(H)), 0xAB, dtype=torch.uint8, device=DEV)
        q, s = fp8.unpack(packed, H)
        _fp8.quantize(x, q.view(torch.uint8), s, tile=tile)
        assert torch.equal(packed.cpu(), fp8.pack(q_ref, s_ref)), (tile, T, H)
        hard = torch.full((T, fp8.packed_width(H)), 0xAB, dtype=torch.uint8, device=DEV)
        q, s = fp8.unpack(hard, H)
        _fp8.quantize(x, q.view(torch.uint8), s, soft=False, tile=tile)
        if DEV.type == "cuda":
            assert torch.equal(hard.cpu(), fp8.pack(q_ref, s_ref)), (tile, T, H)


def test_quant_tile_syntax(monkeypatch):
    from moe_dispatch.kernels import _fp8
    t = _fp8.QuantTile.parse("32:4:flat:p8:pf:ev")
    assert (t.block_g, t.num_warps, t.rows, t.flat, t.persistent, t.prefetch, t.evict) == \
        (32, 4, 1, True, 8, True, True)
    for spec in QUANT_TILES:
        assert str(_fp8.QuantTile.parse(spec)) == spec
    assert _fp8.QuantTile.parse("64,4") == _fp8.QuantTile(64, 4)
    for bad, msg in [("64", "bad quantise tile"), ("64:4:x", "bad quantise tile"),
                     ("48:4", "power of two"), ("8:4:3", "power of two"),
                     ("8:4:2:flat", "rows must be 1"), ("8:4:pf", "prefetch needs")]:
        with pytest.raises(ValueError, match=msg):
            _fp8.QuantTile.parse(bad)
    # The library's default and its overrides.
    monkeypatch.delenv("MOE_DISPATCH_FP8_QUANT", raising=False)
    monkeypatch.delenv("MOE_DISPATCH_FP8_BLOCK", raising=False)
    assert _fp8.quant_tile(56) == _fp8.QuantTile(64, 4)
    monkeypatch.setenv("MOE_DISPATCH_FP8_BLOCK", "8,2")
    assert _fp8.quant_tile(56) == _fp8.QuantTile(8, 2)
    monkeypatch.setenv("MOE_DISPATCH_FP8_QUANT", "32:4:flat:p8")
    assert _fp8.quant_tile(56) == _fp8.QuantTile(32, 4, flat=True, persistent=8)
    # Grids: one program per tile, or a few per SM (2 "SMs" off a GPU).
    assert _fp8.quant_grid(_fp8.QuantTile(64, 4), 4096, 56, torch.device("cpu")) == (4096, 4096)
    assert _fp8.quant_grid(_fp8.QuantTile(8, 4, 8), 4096, 56, torch.device("cpu")) == (3584,) * 2
    assert _fp8.quant_grid(_fp8.QuantTile(32, 4, flat=True, persistent=8), 4096, 56,
                           torch.device("cpu")) == (16, 7168)


@needs_triton
def test_quantize_follows_env_tile(monkeypatch):
    """MOE_DISPATCH_FP8_QUANT picks the tile of every quantise launch (fp8.quantize_packed on
    a GPU, _fp8.quantize here), with the same bytes."""
    from moe_dispatch.kernels import _fp8
    seen = []
    orig = _fp8._launch
    monkeypatch.setattr(_fp8, "_launch", lambda k, grid, *a, **kw: (
        seen.append((grid, kw.get("FLAT"), kw.get("PERSISTENT"))), orig(k, grid, *a, **kw)))
    monkeypatch.setenv("MOE_DISPATCH_FP8_QUANT", "2:2:flat:p1")
    x = _x(5, 256, torch.bfloat16, torch.Generator().manual_seed(2))
    q = torch.empty(5, 256, dtype=torch.uint8, device=DEV)
    s = torch.empty(5, 2, device=DEV)
    _fp8.quantize(x.to(DEV), q, s)
    q_ref, s_ref = fp8.quantize_reference(x)
    assert torch.equal(q.cpu(), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
    assert seen == [((2 if DEV.type == "cpu" else min(5, _fp8._num_sms(0)),), True, True)]


def _plans(kind, N, K, L, g):
    lid = torch.randint(0, L, (N, K), generator=g)
    lid[torch.rand(N, K, generator=g) < 0.3] = -1
    if kind == "group":
        return group_plan(lid, L)
    if kind == "group_pad":
        return group_plan(lid, L, pad_multiple=4)
    return budget_plan(lid, L, budget=max(N * K // 2, 1), pad_multiple=2)  # drops rows (-2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["group", "group_pad", "budget"])
def test_dequant_scatter_kernel_matches_reference(dtype, kind):
    """The receive-side permute: every output row written (poisoned buffers), bit-exact
    rows, e4m3 bytes, scales and probs against permute + dequantise in torch."""
    from moe_dispatch.kernels import _fp8
    g = torch.Generator().manual_seed(17)
    N, K, L, H = 9, 3, 4, 256
    packed = fp8.pack(*fp8.quantize_reference(_x(N, H, torch.float32, g)))
    probs = torch.rand(N, K, generator=g)
    plan = _plans(kind, N, K, L, g)
    tok_ref, p_ref, rows_ref = wire._dequant_permute(packed, probs, plan, H, dtype)
    q_ref, s_ref = rows_ref.rows()
    pos, filled = kernels.plan_maps(plan)
    M = plan.num_out_rows
    tok = torch.full((M, H), float("nan"), dtype=dtype, device=DEV)
    pr = torch.full((M,), float("nan"), device=DEV)
    q = torch.full((M, H), 0xAB, dtype=torch.uint8, device=DEV)
    s = torch.full((M, H // 128), float("nan"), device=DEV)
    to = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    _fp8.scatter(packed.to(DEV), H, pos.to(DEV), out_MH=tok, probs_NK=probs.to(DEV),
                 probs_M=pr, filled_M=to(filled))
    _fp8.scatter(packed.to(DEV), H, pos.to(DEV), q_MH=q, s_MG=s, filled_M=to(filled))
    assert torch.equal(tok.cpu(), tok_ref) and torch.equal(pr.cpu(), p_ref)
    assert torch.equal(q.cpu(), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
    assert torch.equal(fp8.dequantize(q_ref, s_ref, dtype), tok_ref)


@needs_triton
def test_hardware_rounding_variant_launches():
    """The GPU variant (hardware conversions, SOFT=False) launched once here so the sm_90
    compile check covers it. The interpreter's float down-casts are not round-to-nearest-
    even, so its values are compared only on a GPU (the tests above run it there)."""
    from moe_dispatch.kernels import _fp8
    H = 256
    x = torch.randn(4, H).to(DEV, torch.bfloat16)
    q = torch.empty(4, H, dtype=torch.uint8, device=DEV)
    s = torch.empty(4, 2, device=DEV)
    _fp8.quantize(x, q, s, soft=False)
    pos = torch.tensor([[0, -1], [2, 1], [-1, -1], [3, -2]], device=DEV)
    out = torch.empty(4, H, dtype=torch.bfloat16, device=DEV)
    packed = torch.cat([q, s.view(torch.uint8)], 1)
    _fp8.scatter(packed, H, pos, out_MH=out, soft=False)
    if DEV.type == "cuda":
        assert torch.equal(q.cpu(), fp8.quantize_reference(x.cpu())[0].view(torch.uint8))


def test_error_bound():
    """README's bound, element by element: |x' - x| <= 2^-4 |x| + 2^-10 scale (+ float32
    rounding), never more than amax / 28; a BF16 output adds its own rounding."""
    g = torch.Generator().manual_seed(3)
    x = _x(64, 512, torch.float32, g)
    x[5:] = torch.randn(59, 512, generator=g) * torch.rand(59, 512, generator=g) ** 8
    q, s = fp8.quantize_reference(x)
    xd = fp8.dequantize(q, s).double()
    x64 = x.double()
    s_e = s.double().repeat_interleave(128, dim=1)
    amax = x64.abs().view(64, 4, 128).amax(2).repeat_interleave(128, dim=1)
    err = (xd - x64).abs()
    assert (err <= (2 ** -4 + 2 ** -21) * x64.abs() + 2 ** -10 * s_e).all()
    assert (err <= amax / 28 + 2 ** -21 * x64.abs()).all()
    assert ((fp8.dequantize(q, s, torch.bfloat16).double() - xd).abs() <= 2 ** -8 * xd.abs()).all()
    # e4m3's whole range is used: the block's largest element lands on +-448.
    assert (q.float().abs().view(64, 4, 128).amax(2)[1:] == 448).all()
    torch.testing.assert_close(s[1:], (x.abs().view(64, 4, 128).amax(2) / 448)[1:],
                               rtol=2 ** -22, atol=0)


def test_arguments_checked():
    with pytest.raises(ValueError, match="wire_dtype must be None"):
        MoETokenDispatcher(8, wire_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8.quantize(torch.randn(3, 200))
    disp = MoETokenDispatcher(8, wire_dtype=E4M3)
    assert disp.wire_dtype == E4M3 and "wire_dtype" in repr(disp)
    out = MoETokenDispatcher(8).dispatch(torch.randn(3, 128), topk_idx=torch.zeros(3, 1).long(),
                                         topk_probs=torch.ones(3, 1))
    assert out.tokens_fp8 is None and out.scales is None


@pytest.mark.parametrize("name", ["deepep", "uccl", "hybridep", "nvshmem"])
def test_backends_without_fp8_refuse_it(name):
    cls = registry._load(name)
    with pytest.raises(ValueError, match=f"wire_dtype=float8_e4m3fn is not supported by "
                                         f"backend '{name}' yet"):
        cls(BackendConfig(group=None, num_experts=8, wire_dtype=E4M3))


def test_out_of_tree_backend_without_fp8_refused(monkeypatch):
    monkeypatch.setitem(registry._BACKENDS, "nofp8", "fp8_workers:NoFp8Backend")
    with pytest.raises(ValueError, match="not supported by backend 'nofp8' yet"):
        MoETokenDispatcher(8, backend="nofp8", wire_dtype=E4M3)
    MoETokenDispatcher(8, backend="nofp8")  # fine without an FP8 wire


# ===================================================================== real gloo ranks


def _quantised_case(case):
    """The case with every rank's tokens replaced by dequant(quant(tokens))."""
    xs = [fp8.dequantize(*fp8.quantize_reference(x), x.dtype) for x in case.xs]
    return dataclasses.replace(case, xs=xs)


def _wire_case(case):
    """The case with every rank's tokens replaced by their packed wire bytes (as float32),
    so ``reference_dispatch`` gives the e4m3 bytes and scales each rank must hold."""
    xs = [fp8.pack(*fp8.quantize_reference(x)).float() for x in case.xs]
    return dataclasses.replace(case, xs=xs)


SCENARIOS = {
    # name -> (tokens per rank, case kwargs, dispatcher opts)
    "uneven_masked_pad": (lambda R: [5 + 4 * r for r in range(R)], dict(mask_frac=0.2),
                          {"pad_multiple": 4}),
    "zero_token_rank_zipf": (lambda R: [0] + [9] * (R - 1), dict(skew="zipf"), {}),
    "dense_form": (lambda R: [6] * R, dict(topk=3), {"form": "dense", "topk": 3}),
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["exact", "budget"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fp8_parity(gloo_pool, world, backend, mode, scenario):
    tokens_fn, case_kw, opts = SCENARIOS[scenario]
    kw = dict(hidden=256, num_experts=4 * world, topk=3)
    kw.update(case_kw)
    case = make_case(world, tokens_fn(world), **kw)
    if mode == "budget":
        opts = dict(opts, max_rows_per_rank=4 * max(tokens_fn(world)) * world + 16)  # all fit
    results = gloo_pool(world).run("fp8_workers", "run_fp8_vs_plain", case, backend, opts)
    check_fp8(results, case, opts)


def check_fp8(results, case, opts, ranks=None, tol=1e-5):
    """The FP8 path's results (``fp8_workers.run_fp8_vs_plain``, per rank) against the
    dequant(quant(x)) references; ``ranks``: which entries to check (default all);
    ``tol``: against the float64 dense reference."""
    cq, cw = _quantised_case(case), _wire_case(case)
    ys, gxs, gps = reference_moe(cq)
    for r in (range(len(results)) if ranks is None else ranks):
        got, plain = results[r]["fp8"], results[r]["plain"]
        tok, tpe, pr = reference_dispatch(cq, r, opts.get("pad_multiple"))
        wire_rows = reference_dispatch(cw, r, opts.get("pad_multiple"))[0]
        n = tok.shape[0]
        assert torch.equal(got["tpe"], tpe)
        assert torch.equal(got["tokens"][:n], tok), f"rank {r}: rows != dequant(quant(x))"
        assert torch.equal(got["probs"][:n], pr)
        assert not got["tokens"][n:].any() and not got["probs"][n:].any()
        # The quantised form: the sender's e4m3 bytes and scales, zeros past the real rows.
        q = got["tokens_fp8"]
        assert torch.equal(fp8.pack(q[:n].view(E4M3), got["scales"][:n]).float(), wire_rows)
        assert not q[n:].any() and not got["scales"][n:].any()
        assert torch.equal(fp8.dequantize(q.view(E4M3), got["scales"]), got["tokens"])
        # Combine and gradients: the plain path on dequant(quant(x)) (straight through).
        for key in ("tokens", "tpe", "probs", "y", "gp"):
            assert torch.equal(got[key], plain[key]), f"rank {r}: {key} != plain path"
        assert rel_err(got["gx"], plain["gx"]) < 1e-6
        assert got["status"] == plain["status"] and got["status"] in (None, 0)
        # ... and the single-process float64 reference.
        T, H = case.xs[r].shape
        assert rel_err(got["y"].reshape(T, H), ys[r]) < tol
        assert rel_err(got["gx"], gxs[r]) < tol
        if opts.get("form") != "dense":
            assert rel_err(got["gp"], gps[r]) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_bf16_parity(gloo_pool, backend):
    """BF16 tokens: rows are dequant(quant(x)) rounded once to BF16; combine equals the BF16
    path on those inputs."""
    case = make_case(2, [7, 10], hidden=128, num_experts=8, topk=2, dtype=torch.bfloat16,
                     mask_frac=0.1)
    results = gloo_pool(2).run("fp8_workers", "run_fp8_vs_plain", case, backend, {})
    cq = _quantised_case(case)
    for r, res in enumerate(results):
        got, plain = res["fp8"], res["plain"]
        tok = reference_dispatch(cq, r)[0]
        assert got["tokens"].dtype == torch.bfloat16 and torch.equal(got["tokens"], tok)
        for key in ("probs", "y", "gp"):
            assert torch.equal(got[key], plain[key]), key
        # BF16 path's backward sums a token's rows in BF16; the FP8 path in float32.
        assert rel_err(got["gx"], plain["gx"]) < 1e-2


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_budget_overflow_kept_rows_exact(gloo_pool, world, backend):
    case = make_case(world, [12] * world, hidden=128, num_experts=4 * world, topk=2,
                     skew="one_expert", mask_frac=0.1)
    results = gloo_pool(world).run("fp8_workers", "run_fp8_budget_vs_exact", case, backend,
                                   8, 4)
    for r, res in enumerate(results):
        assert bool(res["status"] & STATUS_ROWS_DROPPED) == (res["exact_rows"] > 8), (r, res)
        assert res["rows_equal"] and res["fp8_equal"] and res["tail_zero"], (r, res)
        assert res["y_err"] < 1e-6 and res["gx_err"] < 1e-6 and res["gp_err"] < 1e-6, res
    assert any(res["status"] & STATUS_ROWS_DROPPED for res in results)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget", [None, 64])
@pytest.mark.parametrize("world", [2, 4])
def test_hidden_not_multiple_of_128_raises_everywhere(gloo_pool, backend, budget, world):
    msgs = gloo_pool(world).run("fp8_workers", "run_fp8_bad_hidden", backend, [96] * world,
                                budget)
    assert all(m and "multiple of 128" in m and "got 96" in m for m in msgs), msgs
    if world == 2:  # one rank's hidden is bad: it names it, the other says which rank
        msgs = gloo_pool(2).run("fp8_workers", "run_fp8_bad_hidden", backend, [128, 200],
                                budget)
        assert "multiple of 128" in msgs[1] and msgs[0] and "[1]" in msgs[0], msgs


def test_wire_dtype_must_agree_across_ranks(gloo_pool):
    res = gloo_pool(2).run_raw("fp8_workers", "construct_wire", [None, E4M3])
    assert all(r[0] == "err" and "wire_dtype" in r[2] and "differ" in r[2] for r in res), res


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["nan_prob", "hidden_size"])
def test_fp8_budget_bad_input_raises_at_check(gloo_pool, backend, which):
    msgs = gloo_pool(2).run("fp8_workers", "run_fp8_budget_bad_input", backend, which, 1)
    assert msgs[1] and "another EP rank" not in msgs[1], msgs
    assert msgs[0] and "another EP rank" in msgs[0], msgs


# ===================================================================== moe-train


def _recipe(hidden=128, **kw):
    from token_dispatcher.model import ModelConfig
    from token_dispatcher.train import DataConfig, Recipe, TrainConfig
    m = ModelConfig(hidden=hidden, layers=2, heads=2, seq_len=16, num_experts=8, top_k=2,
                    ffn_hidden=64, aux_loss_coeff=0.01, z_loss_coeff=0.001, expert_impl="loop")
    return Recipe(name="fp8_test", seed=0, device="cpu", model=m,
                  train=TrainConfig(steps=6, batch_size=8, lr=0.01, warmup_steps=2,
                                    log_every=1, plot=False), data=DataConfig(), **kw)


def test_recipe_wire_dtype_key():
    from token_dispatcher.train import RecipeError, validate_recipe
    validate_recipe(_recipe(wire_dtype="fp8"))
    with pytest.raises(RecipeError, match="'wire_dtype' must be null or fp8"):
        validate_recipe(_recipe(wire_dtype="fp16"))
    with pytest.raises(RecipeError, match="multiple of 128"):
        validate_recipe(_recipe(hidden=96, wire_dtype="fp8"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_with_fp8_wire(gloo_pool, tmp_path, backend):
    """moe-train with ``wire_dtype: fp8`` follows the plain run's loss curve closely."""
    plain = _recipe(dispatcher=backend)
    with_fp8 = _recipe(dispatcher=backend, wire_dtype="fp8")
    la = torch.tensor(gloo_pool(2).run("fp8_workers", "train_losses", plain,
                                       str(tmp_path / "plain"))[0])
    lb = torch.tensor(gloo_pool(2).run("fp8_workers", "train_losses", with_fp8,
                                       str(tmp_path / "fp8"))[0])
    assert not torch.equal(lb, la)  # the rows really were quantised
    torch.testing.assert_close(lb, la, rtol=1e-2, atol=0)
    assert lb[-1] < lb[0] - 0.1
