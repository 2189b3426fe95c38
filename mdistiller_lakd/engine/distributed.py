"""Multi-process training under ``torchrun``: process group, per-rank data, gradient and buffer sync.

``torchrun --nproc_per_node=N tools/train.py --cfg F`` starts N processes; each joins the group from
the environment torchrun sets (NCCL on CUDA with device LOCAL_RANK, gloo on CPU). A plain
``python tools/train.py`` run has no group and every helper here is then a no-op.

``SOLVER.BATCH_SIZE`` keeps upstream's meaning, the global batch of one optimisation step: each of
the N ranks takes ``BATCH_SIZE / N`` samples of it and gradients are averaged across ranks.

Distillers whose forward back-propagates losses itself (``local_backward``: LAKD's eager mode)
cannot run under DistributedDataParallel, whose reducer only sees the final backward; their
gradients are averaged once after the final backward by ``GradientSync`` instead.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from yacs.config import CfgNode

from .cfg import ConfigError
from .resumable import ResumableLoader

MAIN_RANK = 0


def init_distributed() -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1) and return this process's
    training device; without torchrun, the first GPU if there is one, else the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return training_device()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", device_id=training_device())
    else:
        dist.init_process_group("gloo")
    return training_device()


def shutdown() -> None:
    """Leave the process group once every rank is done (the main rank may still be writing)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else MAIN_RANK


def is_main_process() -> bool:
    """The process that logs and writes files (every process when there is no group)."""
    return rank() == MAIN_RANK


def training_device() -> torch.device:
    """``cuda:<current device>`` (LOCAL_RANK under torchrun) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shared_seed(seed: int) -> int:
    """``seed``, or for a negative (unseeded) one under torchrun, a random seed the main rank draws
    for all: the ranks must agree on data order and initial weights."""
    if seed >= 0 or not is_distributed():
        return seed
    drawn = [int(torch.randint(2**31, ())) if is_main_process() else 0]
    dist.broadcast_object_list(drawn, src=MAIN_RANK)
    return drawn[0]


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The average of ``values`` over the ranks (a copy; ``values`` itself without a group)."""
    if not is_distributed():
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total / world_size()


# --------------------------------------------------------------------------------------------------
# Data: each rank's share of a global batch


class ShardedLoader(ResumableLoader):
    """A DataLoader rebuilt around a ``DistributedSampler``: every epoch a fresh shuffle (seeded by
    ``seed`` and the epoch) split across the ranks, ``batch_size / world`` samples per rank."""

    def __init__(self, loader: DataLoader, num_ranks: int, rank_index: int, seed: int) -> None:
        sampler = DistributedSampler(loader.dataset, num_ranks, rank_index, shuffle=True, seed=seed)
        super().__init__(loader, sampler, loader.batch_size // num_ranks)


class GlobalBatchSplit:
    """Rank ``rank_index``'s slice of each batch of a loader that every rank runs identically (the
    tensor pipeline, seeded by EXPERIMENT.SEED): the ranks together see exactly the batches of a
    single-process run. A final batch smaller than the number of ranks is skipped by all."""

    def __init__(self, loader, num_ranks: int, rank_index: int) -> None:
        self.loader, self.num_ranks, self.rank_index = loader, num_ranks, rank_index

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in self.loader:
            if len(batch[0]) < self.num_ranks:
                return
            yield tuple(item.tensor_split(self.num_ranks)[self.rank_index] for item in batch)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def position_state(self) -> dict:
        return self.loader.position_state()

    def resume_at(self, batches: int, state: dict) -> None:
        self.loader.resume_at(batches, state)


def shard_train_loader(loader, seed: int):
    """This rank's training loader under torchrun; ``loader`` itself in a single process."""
    if not is_distributed():
        return loader
    num_ranks = world_size()
    if loader.batch_size % num_ranks:
        raise ConfigError(
            f"SOLVER.BATCH_SIZE {loader.batch_size} is the global batch and must divide evenly among "
            f"the {num_ranks} processes; use a multiple of {num_ranks}"
        )
    if isinstance(loader, DataLoader):
        return ShardedLoader(loader, num_ranks, rank(), shared_seed(seed))
    return GlobalBatchSplit(loader, num_ranks, rank())


# --------------------------------------------------------------------------------------------------
# Model: DDP, or one gradient all-reduce for distillers that back-propagate inside their forward


def _coalesced(tensors: Sequence[torch.Tensor], collective: Callable[[torch.Tensor], object]) -> None:
    """Run ``collective`` in place on ``tensors`` as one flat buffer per dtype (few large messages
    instead of one per tensor) and copy the result back."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        by_dtype[tensor.dtype].append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([tensor.flatten() for tensor in group])
        collective(flat)
        for tensor, chunk in zip(group, flat.split([tensor.numel() for tensor in group])):
            tensor.copy_(chunk.view_as(tensor))


def broadcast_from_main(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with the main rank's values."""
    if is_distributed() and tensors:
        with torch.no_grad():
            _coalesced(tensors, lambda flat: dist.broadcast(flat, src=MAIN_RANK))


def student_side_buffers(distiller: nn.Module) -> list[torch.Tensor]:
    """The buffers training changes (BatchNorm statistics of the student and the connectors); the
    frozen teacher's are left out, and those the distiller keeps equal on every rank itself
    (``rank_synced_buffers``)."""
    synced = set(getattr(distiller, "rank_synced_buffers", ()))
    return [
        buffer for name, buffer in distiller.named_buffers()
        if not name.startswith("teacher.") and name not in synced
    ]


class GradientSync:
    """What DDP does, for a distiller that back-propagates inside its forward: the main rank's
    state (every parameter and buffer, the teacher's too) on every rank, then after each step's
    final backward (``__call__``) every learnable parameter's gradient averaged across ranks exactly
    once, and the main rank's BatchNorm buffers broadcast."""

    def __init__(self, distiller: nn.Module) -> None:
        self.distiller = distiller
        self.parameters = list(distiller.get_learnable_parameters())
        broadcast_from_main([p.detach() for p in distiller.parameters()] + list(distiller.buffers()))

    def __call__(self) -> None:
        average_gradients(self.parameters)
        broadcast_from_main(student_side_buffers(self.distiller))


def average_gradients(parameters: Sequence[nn.Parameter]) -> None:
    """Average the ``.grad`` of ``parameters`` across ranks in place (a no-op without a group); a
    parameter without a gradient here counts as a zero gradient."""
    if not is_distributed():
        return
    for parameter in parameters:
        if parameter.grad is None:  # unused this step here, maybe not on another rank
            parameter.grad = torch.zeros_like(parameter)
    num_ranks = world_size()

    def average(flat: torch.Tensor) -> None:
        dist.all_reduce(flat)  # gloo has no AVG: sum, then divide
        flat.div_(num_ranks)

    _coalesced([p.grad for p in parameters], average)


def _no_sync() -> None:
    """After-backward action where DDP (or a single process) needs none."""


def _check_distributed_config(cfg: CfgNode, device: torch.device) -> None:
    if cfg.SOLVER.SYNC_BN and device.type != "cuda":
        raise ConfigError("SOLVER.SYNC_BN needs CUDA (SyncBatchNorm does not run on the CPU); set it to False")
    if cfg.DISTILLER.TYPE == "CRD":
        raise ConfigError(
            "DISTILLER.TYPE CRD: its memory banks are per-process buffers that ranks would overwrite; "
            "train CRD in a single process (python tools/train.py)"
        )


def prepare_for_training(
    distiller: nn.Module, cfg: CfgNode, device: torch.device
) -> tuple[nn.Module, Callable[[], None]]:
    """``(model, after_backward)``: the module a training step calls and what to run after its
    final backward. Under torchrun: parameters outside ``get_learnable_parameters`` and
    ``get_self_optimized_parameters`` (the teacher) are frozen, BatchNorms of all but the teacher
    become SyncBatchNorm with SOLVER.SYNC_BN, and the distiller is wrapped in DDP, or synchronised by
    ``GradientSync`` when it has ``local_backward``. Self-optimised parameters (a distiller's own
    optimizer steps them and averages their gradients itself) start from the main rank's values and
    stay outside DDP."""
    if not is_distributed():
        return distiller, _no_sync
    _check_distributed_config(cfg, device)
    self_optimized = list(distiller.get_self_optimized_parameters())
    trainable = {id(p) for p in [*distiller.get_learnable_parameters(), *self_optimized]}
    for parameter in distiller.parameters():
        if id(parameter) not in trainable:
            parameter.requires_grad_(False)
    if cfg.SOLVER.SYNC_BN:
        for name, child in distiller.named_children():
            if name != "teacher":  # converted in place: hooks on the blocks stay where they are
                setattr(distiller, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    if getattr(distiller, "local_backward", False):
        return distiller, GradientSync(distiller)
    broadcast_from_main([p.detach() for p in self_optimized])
    self_optimized_ids = {id(p) for p in self_optimized}
    # Kept out of DDP (one call: each call replaces the last one's list): the parameters the method
    # steps itself, and the buffers it keeps equal on every rank, which DDP would otherwise re-send
    # from rank 0 at every forward (PS-KD's buffer: 20 MB a step).
    ignored = [name for name, p in distiller.named_parameters() if id(p) in self_optimized_ids]
    ignored += list(getattr(distiller, "rank_synced_buffers", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, ignored)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(distiller, device_ids=device_ids), _no_sync
