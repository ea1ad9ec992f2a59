import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The test models are tiny: with several intra-op threads their per-op overhead dominates and, on a shared
# 2-core machine, threads fight for cores (measured 3-10x slower). Subprocess tests set their own.
torch.set_num_threads(int(os.environ.get("KIMIA_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
