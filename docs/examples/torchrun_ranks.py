"""Two ranks × two DataLoader workers over the digits preset, training a small DDP model on the classes as they
arrive. Every rank gets the same number of items, so the gradient all-reduce of each step always has a partner.

    torchrun --standalone --nproc_per_node 2 docs/examples/torchrun_ranks.py
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cao2_fast.data import DistilledClasses

if __name__ == "__main__":
    dist.init_process_group("gloo")  # "nccl" on GPUs; before the dataset is iterated (else it refuses)
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = DistilledClasses.from_preset("digits", ipc=10, device="cpu")
    shares = ds.shares()  # each rank's classes; builds the models here (forked workers share them), computes nothing
    if rank == 0:
        print("shares:", shares, flush=True)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    for item in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2):
        loss = torch.nn.functional.cross_entropy(model(item["images"]), item["labels"])
        opt.zero_grad()
        loss.backward()  # DDP all-reduces the gradients here: a rank with fewer items would leave the others waiting
        opt.step()
        seen.append(item["class_id"])
    print(f"rank {rank}: {len(seen)} items, classes {sorted(seen)}", flush=True)
    counts = [None] * world
    dist.all_gather_object(counts, len(seen))
    if rank == 0:
        print("items per rank:", counts, flush=True)
    dist.destroy_process_group()
