"""DistributedDataParallel and FSDP2 (fully_shard) over LoRALinear layers with a frozen base: two
CPU processes with gloo, launched by torchrun as users launch them (tests/dist_worker.py).

After the backward, every rank holds the gradients that one process computes on the whole batch;
only the adapters have gradients; rank 0's adapter state after an optimizer step is complete (every
lora_A and lora_B, full shapes) and equals the single-process one. (The adapter file format of
issue 4 is not on this branch: the test checks the adapter tensors themselves.)"""
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import BACKENDS
import dist_worker

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def _single_process(backend):
    model = dist_worker.build_model(backend)
    x, target = dist_worker.global_batch()
    dist_worker.loss_fn(model(x), target).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    return grads, dist_worker.adapter_state(model.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one(mode, backend, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "dist_worker.py"), "--mode", mode, "--backend", backend,
           "--out", str(tmp_path)]
    with open(tmp_path / "log.txt", "w+") as log:
        # its own session, so that a timeout ends torchrun and both workers, not torchrun alone
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = f"timeout ({proc.wait()})"
        log.seek(0)
        assert rc == 0, log.read()[-6000:]

    grads, adapter = _single_process(backend)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, result in enumerate(ranks):
        assert sorted(result["with_grad"]) == sorted(grads), f"rank {r}: {result['with_grad']}"
        assert all("lora_" in name for name in result["with_grad"])  # the frozen base got none
        for name, g in grads.items():
            torch.testing.assert_close(result["grads"][name], g, rtol=1e-12, atol=1e-14,
                                       msg=lambda m, r=r, name=name: f"rank {r} {name}: {m}")
    saved = ranks[0]["adapter"]
    assert sorted(saved) == sorted(adapter)
    assert len(saved) == 4  # lora_A and lora_B of both layers
    for name, value in adapter.items():
        assert saved[name].shape == value.shape
        torch.testing.assert_close(saved[name], value, rtol=1e-12, atol=1e-14)
