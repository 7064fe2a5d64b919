"""Where the Triton kernel tests run: on a GPU for real, else under TRITON_INTERPRET=1.

Import this before anything that defines the kernels (the interpreter flag is read then).
"""
import importlib.util
import os

import pytest
import torch

try:
    HAS_TRITON = importlib.util.find_spec("triton") is not None
except (ImportError, ValueError):
    HAS_TRITON = False
if HAS_TRITON and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
