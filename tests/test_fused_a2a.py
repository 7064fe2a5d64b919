"""``moe_dispatch.fused_a2a`` offers every name of the seed API page with the same signature.

The page (NeMo AutoModel's ``fused_a2a`` reference) is parsed at test time from
``../shared/seeds/000_594fa3c561791042.txt`` beside the repository; where that file is
absent the same table, transcribed from it, is used instead. Names the seed binds to None
without their library are checked with the CPU stand-ins (tests/fake_ep.py) installed.
How callers see the module (None checks, globals, teardown) is tested in
tests/test_fused_a2a_dropin.py.
"""
import contextlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch

import fake_ep
from moe_dispatch import fused_a2a

SEED = Path(__file__).resolve().parents[1].parent / "shared" / "seeds" / "000_594fa3c561791042.txt"
PREFIX = "nemo_automodel.components.moe.megatron.fused_a2a."
NO_DEFAULT = "<required>"

# Transcribed from the seed page: name -> [(param, default or NO_DEFAULT)], classes, data.
FALLBACK = {
    "functions": {
        "FusedCombine.backward": [("ctx", NO_DEFAULT), ("grad_output", NO_DEFAULT),
                                  ("previous_event", "None")],
        "FusedCombine.forward": [("ctx", NO_DEFAULT), ("x", NO_DEFAULT), ("group", NO_DEFAULT),
                                 ("handle", NO_DEFAULT), ("async_finish", "False"),
                                 ("allocate_on_comm_stream", "False")],
        "FusedDispatch.backward": [("ctx", NO_DEFAULT), ("grad_output", NO_DEFAULT),
                                   ("grad_token_indices", NO_DEFAULT),
                                   ("grad_token_probs", NO_DEFAULT),
                                   ("grad_tokens_per_expert", NO_DEFAULT),
                                   ("grad_handle", NO_DEFAULT)],
        "FusedDispatch.forward": [("ctx", NO_DEFAULT), ("x", NO_DEFAULT),
                                  ("token_indices", NO_DEFAULT), ("token_probs", NO_DEFAULT),
                                  ("num_experts", NO_DEFAULT), ("group", NO_DEFAULT),
                                  ("async_finish", "False"),
                                  ("allocate_on_comm_stream", "False")],
        "HybridEPCombine.backward": [("ctx", NO_DEFAULT), ("grad_x", NO_DEFAULT)],
        "HybridEPCombine.forward": [("ctx", NO_DEFAULT), ("x", NO_DEFAULT), ("handle", NO_DEFAULT),
                                    ("num_permuted_tokens", "None"), ("pad_multiple", "None")],
        "HybridEPDispatch.backward": [("ctx", NO_DEFAULT), ("grad_x", NO_DEFAULT),
                                      ("grad_probs", NO_DEFAULT),
                                      ("grad_scaling_factor", NO_DEFAULT),
                                      ("grad_tokens_per_expert", NO_DEFAULT),
                                      ("grad_handle", NO_DEFAULT)],
        "HybridEPDispatch.forward": [("ctx", NO_DEFAULT), ("x", NO_DEFAULT),
                                     ("routing_map", NO_DEFAULT), ("probs", NO_DEFAULT),
                                     ("group", NO_DEFAULT), ("num_local_experts", NO_DEFAULT),
                                     ("num_sms_dispatch_api", "24"),
                                     ("num_sms_combine_api", "24"),
                                     ("num_permuted_tokens", "None"), ("pad_multiple", "None")],
        "UCCLFusedCombine.backward": [("ctx", NO_DEFAULT), ("grad_output", NO_DEFAULT),
                                      ("_grad_event", "None")],
        "UCCLFusedCombine.forward": [("ctx", NO_DEFAULT), ("x", NO_DEFAULT), ("group", NO_DEFAULT),
                                     ("handle", NO_DEFAULT), ("async_finish", "False"),
                                     ("allocate_on_comm_stream", "False")],
        "UCCLFusedDispatch.backward": [("ctx", NO_DEFAULT), ("grad_output", NO_DEFAULT),
                                       ("grad_token_indices", NO_DEFAULT),
                                       ("grad_token_probs", NO_DEFAULT),
                                       ("grad_tokens_per_expert", NO_DEFAULT),
                                       ("grad_handle", NO_DEFAULT)],
        "UCCLFusedDispatch.forward": [("ctx", NO_DEFAULT), ("x", NO_DEFAULT),
                                      ("token_indices", NO_DEFAULT), ("token_probs", NO_DEFAULT),
                                      ("num_experts", NO_DEFAULT), ("group", NO_DEFAULT),
                                      ("async_finish", "False"),
                                      ("allocate_on_comm_stream", "False")],
        "_is_nvshmem_available": [],
        "free_buffer": [],
        "fused_combine": [("x", NO_DEFAULT), ("group", NO_DEFAULT), ("handle", NO_DEFAULT),
                          ("async_finish", "False"), ("allocate_on_comm_stream", "False")],
        "fused_dispatch": [("x", NO_DEFAULT), ("token_indices", NO_DEFAULT),
                           ("token_probs", NO_DEFAULT), ("num_experts", NO_DEFAULT),
                           ("group", NO_DEFAULT), ("async_finish", "False"),
                           ("allocate_on_comm_stream", "False")],
        "get_buffer": [("group", NO_DEFAULT), ("hidden_bytes", NO_DEFAULT)],
        "get_hidden_bytes": [("x", NO_DEFAULT)],
        "get_uccl_buffer": [("group", NO_DEFAULT), ("hidden_bytes", NO_DEFAULT)],
        "hybrid_ep_combine": [("x", NO_DEFAULT), ("handle", NO_DEFAULT),
                              ("num_permuted_tokens", "None"), ("pad_multiple", "None")],
        "hybrid_ep_dispatch": [("x", NO_DEFAULT), ("routing_map", NO_DEFAULT),
                               ("probs", NO_DEFAULT), ("group", NO_DEFAULT),
                               ("num_local_experts", NO_DEFAULT), ("num_sms_dispatch_api", "24"),
                               ("num_sms_combine_api", "24"), ("num_permuted_tokens", "None"),
                               ("pad_multiple", "None")],
        "init_hybrid_ep_buffer": [("group", NO_DEFAULT), ("hidden_dim", NO_DEFAULT),
                                  ("seq_len", NO_DEFAULT), ("num_local_experts", NO_DEFAULT),
                                  ("num_sms_dispatch_api", NO_DEFAULT),
                                  ("num_sms_combine_api", NO_DEFAULT),
                                  ("fp8_dispatch", NO_DEFAULT)],
        "reset_hybrid_ep_buffer": [],
        "set_deepep_num_sms": [("num_sms", NO_DEFAULT)],
        "set_uccl_num_sms": [("num_sms", NO_DEFAULT)],
        "uccl_fused_combine": [("x", NO_DEFAULT), ("group", NO_DEFAULT), ("handle", NO_DEFAULT),
                               ("async_finish", "False"), ("allocate_on_comm_stream", "False")],
        "uccl_fused_dispatch": [("x", NO_DEFAULT), ("token_indices", NO_DEFAULT),
                                ("token_probs", NO_DEFAULT), ("num_experts", NO_DEFAULT),
                                ("group", NO_DEFAULT), ("async_finish", "False"),
                                ("allocate_on_comm_stream", "False")],
    },
    "classes": ["FusedCombine", "FusedDispatch", "HybridEPCombine", "HybridEPDispatch",
                "UCCLFusedCombine", "UCCLFusedDispatch"],
    "data": {"HAVE_DEEP_EP": "True", "HAVE_HYBRIDEP": "True", "HAVE_UCCL_EP": "True",
             "_buffer": "None", "_hybrid_ep_buffer": "None", "_nvshmem_available": "None",
             "_uccl_buffer": "None"},
}


def parse_seed(text: str) -> dict:
    """Names, parameter lists and data of the seed page's ```python API blocks."""
    functions, classes, data = {}, [], {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        block = block.strip()
        m = re.match(r"class " + re.escape(PREFIX) + r"(\w+)\(\)", block)
        if m:
            classes.append(m.group(1))
            continue
        m = re.match(re.escape(PREFIX) + r"([\w.]+)\((.*?)\)\s*(->.*)?$", block, re.S)
        if m:
            params = []
            for part in [p.strip() for p in m.group(2).split(",") if p.strip()]:
                name, _, default = part.partition("=")
                name = name.split(":")[0].strip()
                params.append((name, default.strip() if default else NO_DEFAULT))
            functions[m.group(1)] = params
            continue
        m = re.match(re.escape(PREFIX) + r"(\w+) = (.*)$", block)
        if m:
            data[m.group(1)] = m.group(2).strip()
    return {"functions": functions, "classes": classes, "data": data}


def seed_table() -> dict:
    if SEED.exists():
        return parse_seed(SEED.read_text())
    return FALLBACK


def test_fallback_table_matches_seed_page():
    if not SEED.exists():
        pytest.skip("seed page not beside the repository")
    assert parse_seed(SEED.read_text()) == FALLBACK


def test_seed_page_is_complete():
    table = seed_table()
    # the names the seed page lists in its summary tables
    assert len(table["classes"]) == 6
    assert len([n for n in table["functions"] if "." not in n]) == 15
    assert len(table["data"]) == 7


def _resolve(name):
    obj = fused_a2a
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(seed_table()["functions"]))
def test_signature_matches_seed(name):
    want = seed_table()["functions"][name]
    # Like the seed, the module binds some names to None when their library is missing.
    bound = _resolve(name) is not None
    with contextlib.nullcontext() if bound else fake_ep.installed():
        sig = inspect.signature(_resolve(name))
    got = []
    for p in sig.parameters.values():
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY), (name, p)
        got.append((p.name, NO_DEFAULT if p.default is p.empty else repr(p.default)))
    assert got == want


@pytest.mark.parametrize("name", seed_table()["classes"])
def test_classes_are_autograd_functions(name):
    cls = getattr(fused_a2a, name)
    assert issubclass(cls, torch.autograd.Function)
    assert isinstance(inspect.getattr_static(cls, "forward"), staticmethod)
    assert isinstance(inspect.getattr_static(cls, "backward"), staticmethod)


@pytest.mark.parametrize("name", sorted(seed_table()["data"]))
def test_data_names(name):
    value = getattr(fused_a2a, name)
    if name.startswith("HAVE_"):
        assert isinstance(value, bool)
    else:
        assert value is None  # nothing was built in this process


def test_have_flags_reflect_this_machine():
    deep_ep = importlib.util.find_spec("deep_ep") is not None
    uccl = importlib.util.find_spec("uccl") is not None
    if not deep_ep:
        assert fused_a2a.HAVE_DEEP_EP is False and fused_a2a.HAVE_HYBRIDEP is False
    if not uccl:
        assert fused_a2a.HAVE_UCCL_EP is False


@pytest.mark.parametrize("shape,dtype,want", [
    ((4, 7168), torch.bfloat16, 14336),
    ((4, 7168), torch.float32, 28672),
    ((0, 4096), torch.float16, 8192),
    ((3, 512), torch.float8_e4m3fn, 1024),   # FP8 rows are sized as 2 bytes per element
    ((3, 512), torch.uint8, 1024),
])
def test_get_hidden_bytes(shape, dtype, want):
    x = torch.zeros(shape, dtype=dtype)
    assert fused_a2a.get_hidden_bytes(x) == want


needs_no_deep_ep = pytest.mark.skipif(importlib.util.find_spec("deep_ep") is not None,
                                      reason="deep_ep is installed here")
needs_no_uccl = pytest.mark.skipif(importlib.util.find_spec("uccl") is not None,
                                   reason="uccl is installed here")


def _one_line_install(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and "install" in msg
    for w in words:
        assert w in msg, (w, msg)


# Without a library the seed's None-bound names are None (tests/test_fused_a2a_dropin.py);
# the functions the seed defines anyway raise ImportError naming what to install.
@needs_no_deep_ep
@pytest.mark.parametrize("call", [
    lambda: fused_a2a.get_buffer(None, 1024),
    lambda: fused_a2a._is_nvshmem_available(),
    lambda: fused_a2a.FusedDispatch.apply(torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.long),
                                          torch.zeros(2, 1), 4, None),
])
def test_deep_ep_missing_errors(call):
    assert fused_a2a.fused_dispatch is None and fused_a2a.set_deepep_num_sms is None
    with pytest.raises(ImportError) as ei:
        call()
    _one_line_install(ei, "deep_ep", "DeepEP", "v1.2.1")


@needs_no_deep_ep
@pytest.mark.parametrize("call", [
    lambda: fused_a2a.HybridEPDispatch.apply(torch.zeros(2, 8), torch.zeros(2, 4, dtype=torch.bool),
                                             torch.zeros(2, 4), None, 2),
    lambda: fused_a2a.init_hybrid_ep_buffer(None, 8, 16, 2, 24, 24, False),
])
def test_hybrid_ep_missing_errors(call):
    assert fused_a2a.hybrid_ep_dispatch is None and fused_a2a.hybrid_ep_combine is None
    with pytest.raises(ImportError) as ei:
        call()
    _one_line_install(ei, "hybrid-ep", "HybridEPBuffer")


@needs_no_uccl
@pytest.mark.parametrize("call", [
    lambda: fused_a2a.get_uccl_buffer(None, 1024),
    lambda: fused_a2a.UCCLFusedDispatch.apply(torch.zeros(2, 8),
                                              torch.zeros(2, 1, dtype=torch.long),
                                              torch.zeros(2, 1), 4, None),
])
def test_uccl_missing_errors(call):
    assert fused_a2a.uccl_fused_dispatch is None and fused_a2a.set_uccl_num_sms is None
    with pytest.raises(ImportError) as ei:
        call()
    _one_line_install(ei, "uccl", "UCCL")


def test_teardown_functions_are_safe_without_buffers():
    fused_a2a.free_buffer()
    fused_a2a.reset_hybrid_ep_buffer()
    assert fused_a2a._buffer is None and fused_a2a._hybrid_ep_buffer is None


def test_fp8_dispatch_refused():
    with pytest.raises(AssertionError):  # the seed asserts, before it looks for the library
        fused_a2a.init_hybrid_ep_buffer(None, 8, 16, 2, 24, 24, True)


def test_availability_report():
    av = fused_a2a.availability()
    assert set(av) == {"deep_ep", "hybrid_ep", "uccl"}
    for name, v in av.items():
        assert v == "available" or ("install" in v and "\n" not in v)
