"""TensorBoard scalars, histograms, images and text, written by one small component (rank 0 only: other ranks get a NullLogger).

Scalars and histograms of one step go out as one event each call: a numerics step writes
a thousand per-layer values, and one event per value would cost more than measuring them.
"""

from __future__ import annotations

from pathlib import Path

from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from torch.utils.tensorboard import SummaryWriter


class TensorBoardLogger:
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer: SummaryWriter | None = None

    @property
    def writer(self) -> SummaryWriter:
        """Opened at the first write: a run refused while it is built leaves no event file (a refused resume
        none in the folder it would have continued)."""
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def _disk(self):
        """A full disk, which the event writer's thread reports at a later write, as one line naming the folder."""
        from mptrain.errors import DiskFull, disk_full_as

        return disk_full_as(lambda: DiskFull(f"no space left on the device writing TensorBoard events to "
                                             f"{self.log_dir}; free space there, then continue"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        summary = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items() if v is not None]
        self._write(summary, step)

    def image(self, tag: str, image, step: int) -> None:
        """A (C, H, W) image with values in [0, 1] (e.g. torchvision's make_grid)."""
        with self._disk():
            self.writer.add_image(tag, image, step)

    def histograms_raw(self, histograms: dict[str, list[float]], bins: list[int], step: int) -> None:
        """Histograms over integer bins (bin b holds values in [b, b+1)), e.g. log2 exponents, by tag."""
        self._write([Summary.Value(tag=tag, histo=_histogram(bins, counts)) for tag, counts in histograms.items()
                     if sum(counts)], step)  # fmt: skip

    def text(self, tag: str, text: str) -> None:
        with self._disk():
            self.writer.add_text(tag, text, 0)

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None  # closed once, even when the flush fails
            with self._disk():
                try:
                    writer.flush()
                finally:
                    writer.close()

    def _write(self, values: list, step: int) -> None:
        if values:
            with self._disk():
                self.writer._get_file_writer().add_summary(Summary(value=values), step)


class NullLogger(TensorBoardLogger):
    """What a data-parallel rank other than 0 logs to: nothing (rank 0 writes the reduced metrics)."""

    def __init__(self):
        pass

    def scalars(self, values, step):
        pass

    def image(self, tag, image, step):
        pass

    def histograms_raw(self, histograms, bins, step):
        pass

    def text(self, tag, text):
        pass

    def close(self):
        pass


def _histogram(bins: list[int], counts: list[float]) -> HistogramProto:
    used = [b for b, c in zip(bins, counts) if c]
    return HistogramProto(
        min=used[0], max=used[-1] + 1, num=sum(counts),
        sum=sum(b * c for b, c in zip(bins, counts)), sum_squares=sum(b * b * c for b, c in zip(bins, counts)),
        bucket_limit=[b + 1 for b in bins], bucket=counts,
    )  # fmt: skip
