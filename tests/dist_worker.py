"""One rank of a data-parallel LoRA training step, launched by torchrun (tests/test_distributed.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py \\
        --mode ddp|fsdp2 --backend torch|triton --out DIR

Each rank takes its share of one global batch, runs forward and backward through a model of
LoRALinear layers with a frozen base (wrapped in DistributedDataParallel, or sharded with FSDP2's
fully_shard), takes one SGD step and writes to DIR/rank{r}.pt: the full gradient of every trainable
parameter after the reduction, the names of parameters that got a gradient, and (rank 0) the
adapter state gathered from all ranks. The test compares them with one process on the whole batch.
CPU and gloo here; the same script runs on GPUs with nccl (--device cuda).
"""
from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn

import fastlora

GLOBAL_BATCH, SEQ, DIM = 4, 3, 16


def build_model(backend: str, device="cpu") -> nn.Module:
    """The same model and initialisation in every process (and in the single-process reference)."""
    torch.manual_seed(0)
    kw = dict(r=4, alpha=8, backend=backend, init_lora_weights=False, device=device,
              dtype=torch.float64)
    return nn.Sequential(fastlora.LoRALinear(DIM, 24, **kw), nn.Tanh(),
                         fastlora.LoRALinear(24, DIM, bias=False, **kw))


def global_batch(device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, SEQ, DIM, generator=g, dtype=torch.float64)
    target = torch.randn(GLOBAL_BATCH, SEQ, DIM, generator=g, dtype=torch.float64)
    return x.to(device), target.to(device)


def loss_fn(y, target):
    return (y - target).square().mean()  # a mean over the batch: DDP's gradient average matches


def adapter_state(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items() if "lora_" in k}


def train_step(mode: str, backend: str, device: torch.device, rank: int, world: int) -> dict:
    """Forward, backward and one SGD step on this rank's share; the gradients and (rank 0) the
    gathered adapter state. Everything distributed is local here, so it is freed on return."""
    model = build_model(backend, device)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, fastlora.LoRALinear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    x, target = global_batch(device)
    share = GLOBAL_BATCH // world
    mine = slice(rank * share, (rank + 1) * share)
    loss_fn(model(x[mine]), target[mine]).backward()

    prefix = "module." if mode == "ddp" else ""
    grads, with_grad = {}, []
    for name, p in model.named_parameters():
        name = name.removeprefix(prefix)
        if p.grad is not None:
            with_grad.append(name)
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2: DTensor
            grads[name] = g.detach().cpu().clone()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()

    if mode == "ddp":
        state = model.module.state_dict() if rank == 0 else None
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        # every rank joins the all-gather; with cpu_offload only rank 0 receives the tensors
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    result = {"grads": grads, "with_grad": with_grad}
    if rank == 0:
        result["adapter"] = adapter_state(state)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        result = train_step(args.mode, args.backend, device, rank, world)
        torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
        # The DDP / FSDP2 model is gone with train_step's frame. Destroyed after the process group
        # instead (its destructor running at interpreter exit), it hung there in about one run in
        # twenty under load, plain nn.Linear models included.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
