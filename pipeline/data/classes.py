"""The run's class vocabulary, the one place that says what a class id means.

Classes are named in a fixed order (``data.classes``, or the sorted tags of the manifest). The
i-th name (0-based) has id i + 1 in every label PNG, CAM row, index row and COCO category; id 0
is the background. The CAM network's outputs and targets are 0-based: position i is class id
i + 1 (a multi-hot over the names).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


class Vocabulary:
    """Class names <-> 1-based ids <-> 0-based multi-hot positions."""

    def __init__(self, names: Iterable[str]):
        self.names = list(names)
        self._ids = {name: i + 1 for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def id(self, name: str) -> int:
        """The id of a class of the vocabulary (KeyError for another name)."""
        return self._ids[name]

    def get(self, name: str) -> int | None:
        """The id of ``name``, or None when the vocabulary has no such class."""
        return self._ids.get(name)

    def ids(self, names: Iterable[str]) -> list[int]:
        """The sorted ids of the classes ``names`` (an image's tags)."""
        return sorted(self._ids[name] for name in names)

    def name(self, class_id: int) -> str:
        return self.names[class_id - 1]

    def multi_hot(self, tag_lists: Iterable[Iterable[str]]) -> np.ndarray:
        """float32 [N, C]: row n has a 1 at position id - 1 of each tag of image n."""
        tag_lists = list(tag_lists)
        targets = np.zeros((len(tag_lists), len(self.names)), np.float32)
        for row, tags in enumerate(tag_lists):
            targets[row, [self._ids[name] - 1 for name in tags]] = 1.0
        return targets

    def categories(self) -> list[dict[str, object]]:
        """COCO categories: {"id", "name", "supercategory"} in id order."""
        return [{"id": i, "name": name, "supercategory": "object"} for i, name in enumerate(self.names, start=1)]
