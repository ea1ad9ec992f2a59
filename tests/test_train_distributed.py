"""`torchrun --nproc_per_node 2` (gloo, CPU; DDP, and FSDP2 as a slow variant) equals one process with the
same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kimia.train.config import load_config
from kimia.train.lm import LMRecipe, LMTrainConfig, train_lm

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "lm_tiny.yaml"
COMMON = ["train.steps=4", "data.synthetic=8", "train.micro_batch=1", "train.save_every=0", "train.log_every=1",
          "train.resume=false"]


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_process_run_equals_single_process(tmp_path, parallel):
    out2 = tmp_path / parallel
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kimia.train.cli", "lm", "--config", str(TINY), f"train.out_dir={out2}", "train.grad_accum=2",
           f"train.parallel={parallel}", *COMMON]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # same global batch (1 x 4 accumulation x 1 process) in this process
        cfg = load_config(LMTrainConfig, TINY, [f"train.out_dir={tmp_path / 'single'}", "train.grad_accum=4", *COMMON])
        _, hist = train_lm(cfg)
    finally:
        torch.set_num_threads(n)

    logged = [json.loads(x) for x in (out2 / "log.jsonl").read_text().splitlines()]
    assert len(logged) == len(hist) == 4
    for a, b in zip(logged, hist):
        assert a["tokens"] == b["tokens"]  # the same examples were seen
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(b["loss"])), (a["loss"], b["loss"])
    w2 = load_file(str(out2 / "export" / "model.safetensors"))
    w1 = load_file(str(tmp_path / "single" / "export" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4, msg=k)
    # training moved the weights, so the comparison is not vacuous
    init = LMRecipe(cfg).build_model(torch.device("cpu")).state_dict()
    assert max(float((w1[k] - init[k]).abs().max()) for k in w1) > 1e-3
