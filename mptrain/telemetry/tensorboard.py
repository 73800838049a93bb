"""TensorBoard scalars, images and text, written by one small component (rank 0 only, later)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class TensorBoardLogger:
    def __init__(self, log_dir: Path):
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image, step: int) -> None:
        """A (C, H, W) image with values in [0, 1] (e.g. torchvision's make_grid)."""
        self.writer.add_image(tag, image, step)

    def histogram_raw(self, tag: str, bins: list[int], counts: list[float], step: int) -> None:
        """A histogram over integer bins (bin b holds values in [b, b+1)), e.g. log2 exponents."""
        total = sum(counts)
        if not total:
            return
        used = [b for b, c in zip(bins, counts) if c]
        self.writer.add_histogram_raw(
            tag, min=used[0], max=used[-1] + 1, num=total,
            sum=sum(b * c for b, c in zip(bins, counts)), sum_squares=sum(b * b * c for b, c in zip(bins, counts)),
            bucket_limits=[b + 1 for b in bins], bucket_counts=counts, global_step=step,
        )  # fmt: skip

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, 0)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
