"""The loaders the trainer reads: DeviceLoader for images held whole on the device, and DataModule, what
every dataset builder returns (spec, train and held-out loaders, artifacts for the run dir)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mptrain.data.seeds import stream_seed
from mptrain.errors import UserError


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its input."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...] = (0.0,)  # pixel value p in [0, 1] is fed as (p - mean) / std
    std: tuple[float, ...] = (1.0,)
    boxes: bool = False  # labels are detection targets: (max_objects, 5) rows of [class, x1, y1, x2, y2], class -1 empty

    @property
    def kind(self) -> str:
        """The data kind a task family reads (mptrain/families.py)."""
        return "boxes" if self.boxes else "image"


class DeviceLoader:
    """Batches over tensors that already live on the device; treat yielded batches as read-only."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
        crop_padding: int = 0,
        flip: bool = False,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.crop_padding, self.flip = crop_padding, flip
        self.device = images.device
        channels = images.shape[1]
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).expand(channels).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).expand(channels).view(1, -1, 1, 1)
        # uint8 pixels -> (p / 255 - mean) / std as one multiply-add.
        self._scale, self._shift = 1.0 / (255.0 * std_t), -mean_t / std_t
        self.epoch = 0
        self.rank, self.world = 0, 1
        self.memory_format = torch.contiguous_format

    @property
    def num_samples(self) -> int:
        return self.images.shape[0]

    def shard(self, rank: int, world: int) -> None:
        """Data parallelism: a shuffled loader yields rank's `batch_size` slice of each global batch of
        `batch_size * world` (one order and one set of augmentation draws for all ranks, so N ranks of
        batch B see exactly what one process of batch N*B sees); an unshuffled one keeps every world-th sample."""
        if world == 1:
            return
        if not self.shuffle:
            if self.num_samples < world:  # a rank without held-out samples would leave the others waiting
                raise UserError(f"the held-out set has {self.num_samples} samples, fewer than the {world} ranks; "
                                "use fewer trainer.devices or a larger held-out set")
            self.images, self.labels = self.images[rank::world], self.labels[rank::world]
            return
        if self.batch_size * world > self.num_samples:
            raise UserError(f"dataset.batch_size={self.batch_size} on {world} ranks needs {self.batch_size * world} "
                            f"training samples (there are {self.num_samples}); use a smaller dataset.batch_size")
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        """Pick the shuffle order and augmentation draws for this epoch (deterministic per seed and epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        step = self.batch_size * self.world
        if self.drop_last:
            return self.num_samples // step
        return -(-self.num_samples // step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        augment = self.crop_padding > 0 or self.flip
        generator = None
        if self.shuffle or augment:
            generator = torch.Generator(device=self.device).manual_seed(stream_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator, device=self.device) if self.shuffle else None
        step = self.batch_size * self.world
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)  # this rank's part of a batch
        for batch in range(len(self)):
            start = batch * step
            index = order[start : start + step][mine] if order is not None else slice(start, start + step)
            x, y = self.images[index], self.labels[index]
            if augment:
                x = self._crop_and_flip(x, generator, step, mine)
            yield self._normalise(x), y

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().mul_(self._scale).add_(self._shift)
        # float data (synthetic) is stored normalised
        return x.contiguous(memory_format=self.memory_format)

    def _crop_and_flip(self, x: torch.Tensor, generator: torch.Generator, draws: int, mine: slice) -> torch.Tensor:
        """Per-sample random crop (zero padding) and horizontal flip as a single gather; `draws` per global
        batch, of which this rank's samples take `mine`."""
        n, channels, height, width = x.shape
        pad = self.crop_padding
        shift_y = torch.randint(-pad, pad + 1, (draws, 1), generator=generator, device=self.device)[mine]
        shift_x = torch.randint(-pad, pad + 1, (draws, 1), generator=generator, device=self.device)[mine]
        rows = torch.arange(height, device=self.device) + shift_y  # (n, H) source row of each output row
        cols = torch.arange(width, device=self.device).expand(n, width)
        if self.flip:
            flipped = torch.rand(draws, 1, generator=generator, device=self.device)[mine] < 0.5
            cols = torch.where(flipped, width - 1 - cols, cols)
        cols = cols + shift_x
        inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        source = rows.clamp(0, height - 1)[:, :, None] * width + cols.clamp(0, width - 1)[:, None, :]
        source = source.view(n, 1, height * width).expand(n, channels, height * width)
        out = x.reshape(n, channels, height * width).gather(2, source).view(n, channels, height, width)
        return out.masked_fill_(~inside[:, None], 0)  # pixels from outside the image are padding: zero


class IndexBatchLoader:
    """Batches of sample indices, collated when read (variable-length samples: utterances, sentence pairs); every
    data-parallel rank takes its slice of every batch. A subclass says which batches an epoch has, in order
    (`epoch_batches`), and how a slice becomes tensors (`collate`)."""

    batch_size: int
    epoch, rank, world = 0, 0, 1

    def epoch_batches(self) -> list[list[int]]:
        raise NotImplementedError

    def collate(self, index: list[int]):
        raise NotImplementedError

    def shard(self, rank: int, world: int) -> None:
        """Each rank takes its slice of every batch (the batches and their order are the same on every rank)."""
        if world > 1 and self.batch_size < world:
            raise UserError(f"dataset.batch_size={self.batch_size} is smaller than the {world} ranks; use a larger one")
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.epoch_batches())

    def __iter__(self) -> Iterator:
        for batch in self.epoch_batches():
            index = batch[self.rank::self.world]
            if index:  # a held-out batch smaller than the ranks leaves some without samples
                yield self.collate(index)


class Loader(Protocol):
    """What the trainer needs of a loader: DeviceLoader (images) and text.StreamLoader both are one."""

    batch_size: int

    @property
    def num_samples(self) -> int: ...

    def __iter__(self) -> Iterator: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def shard(self, rank: int, world: int) -> None: ...


@dataclass
class DataModule:
    spec: Any  # DataSpec (images) or text.TextSpec
    train: Loader
    test: Loader  # the held-out split the trainer evaluates
    artifacts: dict[str, dict] = field(default_factory=dict)  # JSON files for the run dir (e.g. the vocabulary)

    def use_channels_last(self) -> None:
        """Batches in NHWC memory layout (trainer.channels_last), for image data."""
        if not isinstance(self.train, DeviceLoader):
            raise UserError(f"trainer.channels_last is for image models; dataset={self.spec.name} is text")
        self.train.memory_format = self.test.memory_format = torch.channels_last

    def shard(self, rank: int, world: int) -> None:
        """Give this data-parallel rank its part of every batch (see the loaders' `shard`)."""
        self.train.shard(rank, world)
        self.test.shard(rank, world)

    @property
    def train_size(self) -> int:
        return self.train.num_samples

    @property
    def test_size(self) -> int:
        return self.test.num_samples
