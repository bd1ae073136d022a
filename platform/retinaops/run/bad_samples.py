"""Training samples whose file stopped decoding after the driver validated it: skipped, counted, named.

The driver drops the files that are bad when it validates (job.data); a file that goes bad later (changed,
truncated or deleted while the run goes on) is passed over by `SkipBadSamples` in the loader, and each
rank hands the names it saw here. Past data.max_bad_samples over the run, the run stops naming them.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from retinanet.data.skip import SKIPPED
from retinaops.run.evaluation import distributed

logger = logging.getLogger(__name__)

MAX_NAMED = 20


class TooManyBadSamplesError(RuntimeError):
    """More training samples failed to decode than data.max_bad_samples allows."""


class BadSamples:
    """Counts the skipped samples of one rank (`take` per batch) and of all ranks (`end_epoch`)."""

    def __init__(self, max_bad_samples: int) -> None:
        self.max_bad_samples = max_bad_samples
        self.seen: list[str] = []  # this rank's, over the run
        self.total = 0  # every rank's, over the run, as of the last end_epoch
        self.epoch_start = 0  # len(seen) when the epoch began

    def take(self, targets: list[dict], *, epoch: int) -> None:
        """Pop each target's SKIPPED list; raise once this rank alone passes the limit."""
        for target in targets:
            for message in target.pop(SKIPPED, []):
                logger.warning("epoch %d: skipped a training sample: %s", epoch, message)
                self.seen.append(message)
        if self.total + len(self.seen) - self.epoch_start > self.max_bad_samples:
            self._stop(self.seen)

    def end_epoch(self, device: torch.device) -> float:
        """This epoch's skips over all ranks (every rank calls it); raise past the limit over the run."""
        new = self.seen[self.epoch_start :]
        count = torch.tensor([float(len(new))], device=device)  # (1,)
        if distributed():
            dist.all_reduce(count)
        self.epoch_start = len(self.seen)
        self.total += int(count.item())
        if self.total > self.max_bad_samples:
            named = [new]
            if distributed():
                named = [None] * dist.get_world_size()
                dist.all_gather_object(named, new)
            self._stop([m for rank_messages in named for m in rank_messages])
        return float(count.item())

    def _stop(self, messages: list[str]) -> None:
        listed = "; ".join(messages[:MAX_NAMED])
        more = f"; ... and {len(messages) - MAX_NAMED} more" if len(messages) > MAX_NAMED else ""
        raise TooManyBadSamplesError(
            f"{max(self.total, len(messages))} training samples failed to decode after validation, over "
            f"data.max_bad_samples={self.max_bad_samples}; fix or remove these files: {listed}{more}"
        )
