"""The throughput benchmark's distributed variant, under a real torchrun (gloo, 2 ranks on CPU): the DDP-wrapped
step with its collectives trains exactly as the plain step does, so its timing on a GPU measures the same work."""

import json
import os
import subprocess
import sys


def test_ddp_variant_trains_as_the_plain_step_under_torchrun(tmp_path):
    out = tmp_path / "tp"
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "slim_edge.evals.lab.qat_throughput",
        "--model",
        "tiny",
        "--random",
        "--schemes",
        "seq2",
        "--variants",
        "loss+bf16t+kernels,loss+bf16t+kernels+ddp",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "-o",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["world_size"] == 2
    plain, ddp = info["rows"]
    assert ddp["variant"].endswith("+ddp") and not plain["variant"].endswith("+ddp")
    # every rank has the same batches: the all-reduced mean gradient is each rank's, the loss mean each rank's loss
    assert len(ddp["losses"]) == 4
    assert max(abs(a - b) for a, b in zip(ddp["losses"], plain["losses"])) <= 1e-5, (plain, ddp)
    assert ddp["tokens_per_s"] > 0
