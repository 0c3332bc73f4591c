"""Reproducible data order for training and resumption: seeded per-epoch batch samplers.

The order of epoch ``e`` of stream ``s`` (one stream per task for multi-input benchmarks, one
for single-input ones) is a pure function of ``(seed, s, e)``: a permutation drawn from a fresh
``torch.Generator``. A loader therefore has no hidden state to save; resuming at step ``k`` of
epoch ``e`` starts the sampler at batch ``k``. Each loader also gets its own generator (seeded
from the same triple) for the worker seeds, so creating an iterator never draws from the
global RNG (which training restores from checkpoints).

Exact resumption with ``num_workers > 0`` additionally needs datasets whose random
augmentation does not depend on which worker loads a sample; with ``num_workers = 0`` (the
default) augmentation draws from the global RNG, which is checkpointed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigurationError, DataError


def stream_seed(seed: int, stream: str, epoch: int) -> int:
    """A 63-bit seed derived from (seed, stream, epoch), stable across processes and platforms."""
    h = hashlib.sha256(f"mtlens:{seed}:{stream}:{epoch}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices: a seeded permutation per epoch (or sequential order), from a start batch."""

    def __init__(
        self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0, stream: str = "train"
    ):
        if n <= 0:
            raise DataError(f"dataset stream '{stream}' is empty")
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.stream = seed, stream
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def num_batches(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(stream_seed(self.seed, self.stream, self.epoch))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        idx = self.order().tolist()
        for b in range(self.start_batch, self.num_batches()):
            yield idx[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start_batch)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    stream: str,
    num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"dataset of stream '{stream}' has no length; mtlens needs map-style datasets") from None
    sampler = EpochBatchSampler(n, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, stream=stream)
    if drop_last and sampler.num_batches() == 0:
        raise ConfigurationError(
            f"stream '{stream}' has {n} samples, fewer than one batch of {batch_size}; lower train.batch_size"
        )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=getattr(dataset, "collate_fn", None),  # graph datasets batch their own inputs (QM9)
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(stream_seed(seed, stream, -1)),
        persistent_workers=False,
    )


def loader_batches(loader: DataLoader) -> int:
    """Batches per epoch of a loader built by :func:`make_loader`."""
    sampler = loader.batch_sampler
    assert isinstance(sampler, EpochBatchSampler)
    return sampler.num_batches()


def set_loader_epoch(loader: DataLoader, seed: int, epoch: int, start_batch: int = 0) -> None:
    sampler = loader.batch_sampler
    assert isinstance(sampler, EpochBatchSampler)
    sampler.set_epoch(epoch, start_batch)
    loader.generator.manual_seed(stream_seed(seed, sampler.stream, epoch))  # worker seeds of this epoch


class TrainStream:
    """The training batches of one epoch, from any step: single-input or multi-input.

    Single-input: one loader; a batch is ``{"input", "targets": {task: ...}}``.
    Multi-input: one loader per task, zipped step by step (equal batch sizes, ``drop_last``);
    a batch is ``{task: {"input", "target"}}``; an epoch ends with the shortest task stream.
    """

    def __init__(
        self,
        split: Any,
        tasks: list[str],
        multi_input: bool,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_steps: int | None = None,
    ):
        self.tasks, self.multi_input, self.seed = tasks, multi_input, seed
        if multi_input:
            if not isinstance(split, Mapping):
                raise DataError("a multi-input benchmark's train split must be {task: Dataset}")
            missing = [t for t in tasks if t not in split]
            if missing:
                raise DataError(f"multi-input train split lacks task(s) {missing}; it has {list(split)}")
            self.loaders = {
                t: make_loader(
                    split[t],
                    batch_size,
                    shuffle=True,
                    drop_last=True,
                    seed=seed,
                    stream=f"train/{t}",
                    num_workers=num_workers,
                    pin_memory=pin_memory,
                )
                for t in tasks
            }
        else:
            self.loaders = {
                "": make_loader(
                    split,
                    batch_size,
                    shuffle=True,
                    drop_last=True,
                    seed=seed,
                    stream="train",
                    num_workers=num_workers,
                    pin_memory=pin_memory,
                )
            }
        full = min(loader_batches(ld) for ld in self.loaders.values())
        self.steps_per_epoch = min(full, max_steps) if max_steps is not None else full

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, Any]]:
        for ld in self.loaders.values():
            set_loader_epoch(ld, self.seed, epoch, start_step)
        iters = {k: iter(ld) for k, ld in self.loaders.items()}
        for step in range(start_step, self.steps_per_epoch):
            if self.multi_input:
                yield step, {t: next(iters[t]) for t in self.tasks}
            else:
                yield step, next(iters[""])
        del iters


def eval_loaders(
    split: Any,
    tasks: list[str],
    multi_input: bool,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    split_name: str = "val",
) -> dict[str, DataLoader]:
    """Sequential loaders over a whole split (no drop_last): ``{"": loader}`` or ``{task: loader}``."""
    if multi_input:
        if not isinstance(split, Mapping):
            raise DataError(f"a multi-input benchmark's {split_name} split must be {{task: Dataset}}")
        return {
            t: make_loader(
                split[t],
                batch_size,
                shuffle=False,
                drop_last=False,
                seed=0,
                stream=f"{split_name}/{t}",
                num_workers=num_workers,
                pin_memory=pin_memory,
            )
            for t in tasks
        }
    return {
        "": make_loader(
            split,
            batch_size,
            shuffle=False,
            drop_last=False,
            seed=0,
            stream=split_name,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )
    }


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    if hasattr(obj, "to") and hasattr(obj, "num_graphs"):  # a torch_geometric Batch (QM9 inputs)
        return obj.to(device, non_blocking=non_blocking)
    return obj


class ExtraBatches:
    """Extra training batches for methods that need batches independent of the step's
    (``needs_second_batch``: SDMGrad, MoDo; ``needs_lookahead``: Auto-Lambda, MOML).

    They come from ``n`` more seeded streams over the training set (seeds derived from the run's
    seed), independent of the step's batch: the extra batches of step k of epoch e are a pure
    function of (seed, e, k), so a resumed run draws the same ones."""

    def __init__(self, split: Any, tasks: list[str], multi_input: bool, batch_size: int, seed: int, n: int = 2):
        self.streams = [
            TrainStream(split, tasks, multi_input, batch_size, stream_seed(seed, f"second-batch/{k}", 0), 0, False)
            for k in range(n)
        ]
        self._at: tuple[int, int] | None = None
        self._iters: list[Iterator[tuple[int, Any]]] = []

    def draw(self, epoch: int, step: int) -> list[Any]:
        """One batch of every stream for step ``step`` of epoch ``epoch`` (0-based)."""
        if self._at != (epoch, step):
            self._iters = [st.epoch(epoch, step) for st in self.streams]
        out = [next(it)[1] for it in self._iters]
        self._at = (epoch, step + 1)
        return out
