"""Test configuration: deterministic, quiet, CPU-sized."""
import warnings

import pytest
import torch

import lirpa_deq  # noqa: F401  (applies the auto_LiRPA / torch bridge before any test imports it)

# 1 thread: these tests run many tiny ops, where OpenMP synchronisation costs more than it gains
# (measured on the 2-core CI machine: test_models 282 s with 2 threads, 16 s with 1)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # auto_LiRPA 0.3 and torch's ONNX pass warn on every trace; they say nothing about our code
        warnings.filterwarnings("ignore", category=UserWarning, module=r"auto_LiRPA|torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield
