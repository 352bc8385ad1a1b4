"""The embedded default data set: scikit-learn's 1,797 real 8x8 handwritten digits.

They ship inside the scikit-learn wheel (UCI "Optical Recognition of Handwritten Digits"), so
the quickstart needs no download. Pixel values 0..16 are scaled to 0..255; the train/test split
is fixed (stratified, seed 0, 20 % test = 360 images) so accuracies compare across runs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

TEST_FRACTION = 0.2
SPLIT_SEED = 0


class DigitsDataset:
    """Map-style dataset of ``(PIL RGB image 8x8, int label)``; ``split`` is train or test."""

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
        train_idx, test_idx = train_test_split(
            np.arange(len(images)),
            test_size=TEST_FRACTION,
            random_state=SPLIT_SEED,
            stratify=digits.target,
        )
        keep = np.sort(train_idx if split == "train" else test_idx)
        self.images = images[keep]
        self.targets = digits.target[keep].astype(np.int64).tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L").convert("RGB"), self.targets[index]
