"""Test-only helpers for the data tests. The data set writers themselves live in
:mod:`nt_dist.data.synthetic` (the benchmarks use them too)."""

from __future__ import annotations

from PIL import Image

from nt_dist.data.synthetic import random_images


class IndexDataset:
    """``n`` random RGB images whose label is their own index (coverage checks)."""

    def __init__(self, n: int, size: int = 8, seed: int = 0) -> None:
        self.images = random_images(n, size, seed)
        self.classes = [str(i) for i in range(n)]
        self.targets = list(range(n))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), index


def assert_one_line_error(error: BaseException, *fragments: str) -> None:
    """A UserError message is one line and names what the user must fix."""
    message = str(error)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
