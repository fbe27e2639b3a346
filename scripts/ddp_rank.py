"""One rank of PyTorch DDP (gloo) training ref-cnn, the anchor of scripts/cluster_bench.py:
`ddp_rank.py RANK MASTER_ADDR HOOK STEPS` prints the images/s of both ranks (rank 0 only).

HOOK: none, fp16 (DDP's fp16_compress_hook; its bf16 hook refuses CPU tensors) or powersgd
(powerSGD_hook, rank 4, error feedback and warm start: ddl's defaults). 64 images per rank per
step, one thread per rank, channels_last (PyTorch's fastest layout for it on this machine),
random images (the step costs what MNIST's do); timed after 3 warm-up steps.
"""
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

from ddl.models import build, to_torch

WARM = 3


def main(rank, master, hook, steps):
    os.environ.update(MASTER_ADDR=master, MASTER_PORT="29511")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = to_torch(build("ref-cnn", (1, 28, 28), 10, seed=0)).to(
        memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    if hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "powersgd":
        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=4,
                                   start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)
        ddp.register_comm_hook(state, psgd.powerSGD_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(64, 1, 28, 28, generator=gen).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), generator=gen)
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(WARM + steps):
        if i == WARM:
            dist.barrier()
            start = time.perf_counter()
        opt.zero_grad()
        loss_fn(ddp(x), y).backward()
        opt.step()
    dist.barrier()
    if rank == 0:
        print(f"images/s {2 * 64 * steps / (time.perf_counter() - start):.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
