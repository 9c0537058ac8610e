"""A deterministic, resumable, rank-sharded data order.

torch's DistributedSampler reshuffles per epoch but cannot restart in the middle of one, and
a DataLoader iterator cannot be saved. Here the order is a pure function of (seed, epoch),
and the state is just (epoch, offset into that epoch's permutation), so a resumed run is fed
exactly the batches the uninterrupted run would have seen, even on another world size.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader


@dataclass
class SamplerState:
    epoch: int = 0
    offset: int = 0  # samples of this epoch's permutation already consumed, by all ranks


class ResumableBatchSampler:
    """Yields this rank's index batches; one global micro-batch is `batch_size * world_size`.

    Each global micro-batch is a contiguous slice of the epoch's permutation and rank r takes
    the r-th sub-slice, so W ranks with batch B see exactly the samples one process with
    batch B*W would. The tail of an epoch too short for a full global batch is skipped
    (drop_last), which keeps every step's batch shape and every rank's step count equal.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.global_batch = batch_size * world_size
        if dataset_len < self.global_batch:
            raise ValueError(
                f"dataset has {dataset_len} samples, fewer than one global batch "
                f"({batch_size} x {world_size} processes)"
            )
        self.state = SamplerState()

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_len // self.global_batch

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_len))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_len, generator=generator).tolist()

    def remaining_in_epoch(self) -> list[list[int]]:
        """This rank's batches from the current position to the end of the current epoch."""
        order = self.permutation(self.state.epoch)
        batches = []
        start = self.state.offset
        while start + self.global_batch <= self.dataset_len:
            first = start + self.rank * self.batch_size
            batches.append(order[first : first + self.batch_size])
            start += self.global_batch
        return batches

    def advance(self) -> None:
        """Record that one global micro-batch was consumed; roll over to the next epoch."""
        self.state.offset += self.global_batch
        if self.state.offset + self.global_batch > self.dataset_len:
            self.state = SamplerState(epoch=self.state.epoch + 1, offset=0)

    def state_dict(self) -> dict[str, int]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or offset < 0:
            raise ValueError(f"invalid sampler state {state!r}")
        self.state = SamplerState(epoch, offset)
        if offset + self.global_batch > self.dataset_len:
            # Saved under another world size or dataset size: the epoch's tail no longer
            # holds a full batch here.
            self.state = SamplerState(epoch + 1, 0)


def _ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group. A worker killed by it makes the main process
    # fail on its next batch instead of finishing the step and checkpointing; the main
    # process decides when to stop, and workers end with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BatchStream:
    """Endless stream of collated batches following a ResumableBatchSampler.

    A DataLoader runs the loading (worker processes, pinned memory) for the rest of the
    current epoch; the sampler advances only when a batch is actually handed out, so batches
    a worker prefetched but the loop never used are not counted as seen.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        collate_fn: Callable[[list[Any]], Any] | None,
        sampler: ResumableBatchSampler,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.sampler = sampler
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._iterator: Iterator[Any] | None = None

    def reset(self) -> None:
        """Drop the current loader (call after the sampler state was changed from outside)."""
        self._iterator = None

    def _start_loader(self) -> Iterator[Any]:
        state = self.sampler.state
        # DataLoader draws its worker base seed from this generator; without one it draws
        # from the global torch RNG, so where an epoch starts would change the model's RNG
        # stream (dropout) and a resumed run would diverge.
        generator = torch.Generator().manual_seed(
            self.sampler.seed * 1_000_003 + state.epoch * 10_007 + state.offset
        )
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler.remaining_in_epoch(),
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
            worker_init_fn=_ignore_stop_signals if self.num_workers else None,
        )
        return iter(loader)

    def next_batch(self) -> Any:
        for _ in range(2):  # a loader can only be empty right at an epoch's end
            if self._iterator is None:
                self._iterator = self._start_loader()
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                continue
            self.sampler.advance()
            if self.sampler.state.offset == 0:
                self._iterator = None  # the epoch rolled over; the next loader starts it
            return batch
        raise RuntimeError("data stream produced no batch for a whole epoch")


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor inside a batch (tensors, dicts, lists, tuples, dataclasses)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: move_to_device(getattr(batch, f.name), device, non_blocking)
            for f in dataclasses.fields(batch)
            if f.init
        }
        return dataclasses.replace(batch, **changes)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
    if callable(getattr(batch, "to", None)):  # e.g. transformers' BatchEncoding
        return batch.to(device)
    if isinstance(batch, list):
        return [move_to_device(v, device, non_blocking) for v in batch]
    if isinstance(batch, tuple):
        items = [move_to_device(v, device, non_blocking) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    return batch
