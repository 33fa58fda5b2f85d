"""Training on several GPUs: DistributedDataParallel under torchrun (Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training").

    torchrun --nproc_per_node 2 train.py --subject data/raj --batch-size 1      # 2 GPUs, 2 rows each step

torchrun starts one process per GPU and gives each RANK, LOCAL_RANK and WORLD_SIZE (and where to
meet: MASTER_ADDR, MASTER_PORT) in environment variables. Every process loads the model and runs
the same loop on its share of each batch; DistributedDataParallel (DDP) averages the gradients
over the processes during backward (an all-reduce, bucketed so it overlaps the backward pass), so
every process applies the same update and the copies of the model stay identical.

What is shared and what is split:

- batches: every rank draws the same *global* batch (--batch-size per GPU times the number of
  GPUs, from the one seeded training generator) and keeps its own rows (`shard`). So N GPUs see
  exactly the batches of one process with N times the batch size, the mean of the N gradients is
  that process's gradient, and a checkpoint's one generator state resumes every rank;
- class images: rank r generates missing images r, r + N, r + 2N, ... (prior.fill_class_folder);
- files: rank 0 alone writes the run folder (config, cache, logs, checkpoints, validation grids,
  the result); the other ranks read the cache rank 0 wrote, so all train on the same latents;
- Ctrl-C: a stop requested on any rank stops all ranks after the same step.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op and training runs as one
process. One machine with several GPUs is the case this is written for; several machines work the
same way when the run folder is on a file system they share.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from minidream.step import Batch


@dataclass
class Dist:
    """This process's place among the training processes."""

    rank: int = 0  # 0 .. world_size - 1; rank 0 writes the files
    world_size: int = 1
    device: torch.device | None = None  # this rank's device (cuda:LOCAL_RANK); None: single process chooses

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every rank got here (e.g. rank 0 finished writing a file the others read)."""
        if self.enabled:
            torch_dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable object, e.g. the run folder's path)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a tensor (every rank's own losses -> the global batch's losses)."""
        if not self.enabled:
            return values
        values = values.clone()
        torch_dist.all_reduce(values)  # sum: gloo has no average
        return values / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    def shard(self, batch: Batch) -> Batch:
        """This rank's rows of a global batch: its instance rows and its class rows.

        A global batch is [instance rows (world_size * b); class rows (0 or world_size * b)], each
        half in rank order, so rank r keeps rows r*b .. (r+1)*b - 1 of each half."""
        if not self.enabled:
            return batch
        b = batch.num_instance // self.world_size
        rows = torch.arange(self.rank * b, (self.rank + 1) * b)
        if batch.latents.shape[0] > batch.num_instance:
            rows = torch.cat([rows, rows + batch.num_instance])
        rows = rows.to(batch.latents.device)

        def take(x):
            return None if x is None else x[rows]

        weights = None if batch.pixel_weights is None else batch.pixel_weights[rows[:b]]  # instance rows
        return replace(batch, latents=take(batch.latents), noise=take(batch.noise), timesteps=take(batch.timesteps),
                       time_ids=take(batch.time_ids), prompt_index=take(batch.prompt_index), num_instance=b,
                       pixel_weights=weights)

    def wrap(self, unet: nn.Module, text_modules: dict[str, nn.Module], find_unused: bool):
        """The model training_step calls: the UNet, or on several ranks DDP over every trained module.

        text_modules: text encoders holding trained parameters. They run inside training_step's
        embed_prompts, in the same autograd graph as the UNet, so DDP's hooks average their
        gradients too. find_unused: set when text-encoder weights train (LoRA or full): SDXL reads
        CLIP-L's penultimate layer, so its last layer gets no gradient, and DDP must then look for
        such parameters every step.
        """
        if not self.enabled:
            return unet
        module = TrainedModules(unet, text_modules)
        device_ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused)

    def accumulating(self, model, last_micro_step: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of gradient accumulation."""
        if self.enabled and not last_micro_step:
            return model.no_sync()
        return contextlib.nullcontext()


class TrainedModules(nn.Module):
    """The UNet plus the text encoders that train, as one module for DDP; its forward is the UNet's."""

    def __init__(self, unet: nn.Module, text_modules: dict[str, nn.Module]):
        super().__init__()
        self.unet = unet
        self.text = nn.ModuleDict(text_modules)

    def forward(self, *args):
        return self.unet(*args)


def setup(device: str | None = None) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else a one-process Dist.

    GPUs talk through NCCL; on CPUs (or --device cpu, as the tests run) the gloo backend is used.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        # Rank 0 alone encodes the cache and draws validation grids while the others wait at a
        # barrier: minutes on real SDXL, so a longer wait than the default before giving up.
        torch_dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    return Dist(rank, world_size, torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
