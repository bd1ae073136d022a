"""Training past a file that stopped decoding after it was validated (changed, truncated or deleted since).

    loader = DataLoader(SkipBadSamples(dataset), collate_fn=collate, ...)
    for images, targets in loader:
        skipped = [s for t in targets for s in t.pop(SKIPPED)]   # one line per skipped file

The bad sample is replaced by the next index that decodes, so every batch keeps its size (DDP ranks
step together) and the skip is named in the replacing sample's target rather than lost inside a
DataLoader worker process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

SKIPPED = "skipped"  # target key: messages of the samples this one replaced, each naming its file


class SkipBadSamples(torch.utils.data.Dataset):
    """`dataset[i]`, or the next index that decodes when it raises ValueError (what `read_image` raises on
    a missing or undecodable file); target[SKIPPED] lists the messages of the ones passed over. After
    max_in_a_row failures in a row it raises ValueError naming them: the data is gone, not one file."""

    def __init__(self, dataset: torch.utils.data.Dataset, max_in_a_row: int = 16) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row: expected >= 1, got {max_in_a_row}")
        self.dataset = dataset
        self.max_in_a_row = max_in_a_row

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        skipped: list[str] = []
        for k in range(min(self.max_in_a_row, len(self.dataset))):
            try:
                image, target = self.dataset[(index + k) % len(self.dataset)]
            except ValueError as e:
                skipped.append(str(e))
                continue
            return image, {**target, SKIPPED: skipped}
        listed = "\n".join(skipped)
        raise ValueError(f"{len(skipped)} samples in a row failed to decode, from index {index}:\n{listed}")
