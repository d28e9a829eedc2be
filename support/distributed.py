"""
Several processes: `torchrun --nproc_per_node=N script.py` sets RANK / WORLD_SIZE / LOCAL_RANK.
Every rank draws the same global batch from the same seeded generator and trains on its own
slice; DistributedDataParallel averages the gradients, so N processes follow the same trajectory
as one process with the same global batch. Rank 0 alone evaluates, decides when to stop and
writes files; the other ranks follow its decisions.
"""
import os
import socket
import sys

import torch
import torch.distributed as dist

from support.config import UserError
from support.files import release_locks


def setup_distributed(device):
    """Returns (rank, world_size, device); joins the process group when run under torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, device
    on_cuda = device.startswith("cuda")
    if on_cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    elif os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):
        # Every process is on this machine, so gloo can talk over loopback, which is always there,
        # rather than over whatever interface the hostname happens to resolve to.
        loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
        if loopback:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
    dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def finish_distributed():
    """Leave the process group together, then exit at once. Every output is already written (and
    atomically), and a normal interpreter exit would run C++ destructors of torch's background
    threads: on a loaded machine one of them now and then aborts the process ("terminate called
    without an active exception", exit code -6) after the run has succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        release_locks()  # os._exit skips atexit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def shard(batch, rank, world_size):
    """This rank's contiguous slice of a global batch."""
    if len(batch) % world_size:
        raise UserError(f"batch of {len(batch)} does not split evenly over {world_size} processes: "
                        f"choose a batch size divisible by --nproc_per_node")
    n = len(batch) // world_size
    return batch[rank * n:(rank + 1) * n]


def global_mean(value, world_size):
    """Average a scalar tensor over ranks (for logging the same number a single process would)."""
    if world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world_size
    return value


def rank0_only(rank, world_size, action):
    """Run action() on rank 0 alone (the rank that writes files); if it refuses with a UserError,
    every rank stops, not only rank 0 (the others would wait for it forever)."""
    error, result = None, None
    if rank == 0:
        try:
            result = action()
        except UserError as e:
            error = e
    refused, = from_rank0([error is not None], world_size)
    if refused:
        raise error or UserError("rank 0 refused to start the run: see its message")
    return result


def from_rank0(values, world_size):
    """Rank 0's decisions (whole numbers: flags such as "stop now", step numbers), shared with every
    rank so that all act together. Returns them as a list."""
    if world_size == 1:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values])
    dist.broadcast(t, 0)
    return t.tolist()
