"""The training resolution of each epoch, and the evaluation resolution: progressive resizing
as ffcv-imagenet schedules it.

Followed: ``ImageNetTrainer.get_resolution`` of ffcv-imagenet's ``train_imagenet.py``
(github.com/libffcv/ffcv-imagenet): epochs ``0 .. start_ramp`` train at ``min_res``, epochs from
``end_ramp`` on at the final resolution, and an epoch in between at the straight line from
``(start_ramp, min_res)`` to ``(end_ramp, max_res)``, rounded to the nearest multiple of 32
(half to even, as ``np.round``). Deviations: the final resolution is ``data.image_size`` (their
``max_res``), and the multiple is ``data.res_step`` (their 32, the default), so tiny test images
can ramp too. The resolution is a pure function of the epoch: a run resumed mid-epoch trains at
the resolution of that epoch, and the whole schedule is the same whatever stopped it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nt_dist.config import DataConfig

EVAL_CROP_RATIO = 0.875  # the default data.eval_crop_ratio: 224 of 256, ffcv-imagenet's DEFAULT_CROP_RATIO


@dataclass(frozen=True)
class ResolutionSchedule:
    """``at(epoch)``: the side in pixels of the training images of ``epoch`` (0-based)."""

    image_size: int  # the final resolution (every epoch's, without a ramp)
    min_res: int = 0  # 0: no ramp
    start_ramp: int = 0
    end_ramp: int = 0
    step: int = 32

    @classmethod
    def of(cls, cfg: DataConfig) -> ResolutionSchedule:
        return cls(cfg.image_size, cfg.min_res, cfg.start_ramp, cfg.end_ramp, cfg.res_step)

    @property
    def ramps(self) -> bool:
        return 0 < self.min_res != self.image_size

    def at(self, epoch: int) -> int:
        if not self.ramps or epoch >= self.end_ramp and epoch > self.start_ramp:
            return self.image_size
        if epoch <= self.start_ramp:
            return self.min_res
        share = (epoch - self.start_ramp) / (self.end_ramp - self.start_ramp)
        value = self.min_res + share * (self.image_size - self.min_res)
        return int(round(value / self.step)) * self.step

    def sizes(self, epochs: int) -> list[int]:
        """The resolution of every epoch of an ``epochs``-epoch run."""
        return [self.at(epoch) for epoch in range(epochs)]


def eval_size(cfg: DataConfig) -> int:
    """The evaluation resolution: ``data.eval_image_size``, else ``data.image_size``."""
    return cfg.eval_image_size or cfg.image_size
