"""Live training progress in the driver, and the step loss in MLflow.

    rank 0 (ProgressPoster) -- every train.log_every_steps steps and at each epoch's end --> ProgressBoard
    (an actor on the driver's node) -- taken twice a second by `follow_progress`'s thread --> ProgressDisplay
    (a tqdm bar per epoch on a terminal, one line per epoch otherwise) and MLflow (`loss_step`, at the
    global step).

Why not `ray.train.report` every N steps: in Ray Train V2 each report is a barrier of all workers, and a
worker's result queue holds one report until the controller collects it, every 2 s
(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so frequent reports stall training; and every report reaches
Tune, whose scheduler and search expect one result per epoch. A post costs rank 0 one `.item()` every
N steps, no barrier, and the workers never wait for the board.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

if TYPE_CHECKING:
    import torch

    from retinaops.job.spec import TrainSpec
    from retinaops.tracking.tracker import Tracker

logger = logging.getLogger(__name__)

STEP_LOSS = "loss_step"  # MLflow metric at the global step; the per-epoch `loss` stays at step = epoch


@dataclass(frozen=True)
class Progress:
    """Rank 0's view after a step (`done` False) or at the end of an epoch (`done` True)."""

    epoch: int  # 0-based
    epochs: int
    step: int  # steps of this epoch done
    steps: int  # steps per epoch
    global_step: int
    loss: float  # rank 0's mean since its last post; when done, the epoch's mean over all ranks
    images_per_s: float  # of all ranks (rank 0's rate times the world size until done)
    done: bool = False
    ap: float | None = None  # COCO AP of the epoch's evaluation, when done and evaluated


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Holds rank 0's posts until the driver takes them (the newest 10,000 at most)."""

    def __init__(self) -> None:
        self._posts: collections.deque[Progress] = collections.deque(maxlen=10_000)

    def post(self, progress: Progress) -> None:
        self._posts.append(progress)

    def take(self) -> list[Progress]:
        posts = list(self._posts)
        self._posts.clear()
        return posts


class ProgressPoster:
    """A Ray Train worker's side of the board: rank 0 posts; on other ranks, and without a board (a
    local run), every call returns at once."""

    def __init__(self, board: Any, train: TrainSpec, *, steps: int) -> None:
        context = ray.train.get_context()
        self.board = board if context.get_world_rank() == 0 else None
        self.every, self.epochs, self.steps = train.log_every_steps, train.epochs, steps
        self.world = context.get_world_size()
        self.epoch, self.done_steps, self.last = 0, 0, None

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.done_steps = epoch, 0
        self._reset_window()

    def step(self, loss: torch.Tensor, num_images: int, *, global_step: int) -> None:
        """After an optimizer step: the loss stays on the device until a post needs it."""
        if self.board is None:
            return
        self.done_steps += 1
        self.window_steps += 1
        self.window_images += num_images
        loss = loss.detach().float()  # ()
        self.window_loss = loss if self.window_loss is None else self.window_loss + loss  # ()
        if self.every and global_step % self.every == 0:
            seconds = time.perf_counter() - self.window_started
            loss_mean = self.window_loss.item() / self.window_steps  # the one sync, every N steps
            rate = self.window_images * self.world / max(seconds, 1e-9)
            done, steps = self.done_steps, self.steps
            self._post(Progress(self.epoch, self.epochs, done, steps, global_step, loss_mean, rate))
            self._reset_window()

    def end_epoch(self, metrics: dict[str, Any]) -> None:
        """After the epoch's metrics are final; after the last epoch, wait (10 s at most) for the board."""
        if self.board is None:
            return
        ap = metrics.get("AP")
        self._post(
            Progress(
                self.epoch,
                self.epochs,
                self.done_steps,
                self.steps,
                int(metrics["step"]),
                float(metrics["loss"]),
                float(metrics["images_per_s"]),
                done=True,
                ap=float(ap) if ap is not None else None,
            )
        )
        if self.epoch + 1 == self.epochs:
            ray.wait([self.last], timeout=10)

    def _post(self, progress: Progress) -> None:
        self.last = self.board.post.remote(progress)  # not waited for: the board may be slow or gone

    def _reset_window(self) -> None:
        self.window_loss: torch.Tensor | None = None
        self.window_steps, self.window_images = 0, 0
        self.window_started = time.perf_counter()


class ProgressDisplay:
    """Shows Progress on `stream` (default stderr): a tqdm bar per epoch (step of steps, rate, ETA, loss,
    images/s) when it is a terminal, else one plain line per finished epoch with the run's ETA."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        label: str = "",
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bar = self.stream.isatty() if bar is None else bar
        self.label, self.clock = label, clock
        self.started = clock()
        self.first_epoch: int | None = None  # the pace counts from here (the start, or a restart)
        self.last_epoch = -1
        self._bar: tqdm | None = None
        self._bar_epoch = -1

    def show(self, progress: Progress) -> None:
        if self.first_epoch is None:
            self.first_epoch = progress.epoch
        elif progress.epoch < self.last_epoch:  # workers restarted from an earlier checkpoint
            self.first_epoch, self.started = progress.epoch, self.clock()
        self.last_epoch = progress.epoch
        if self.bar:
            self._show_bar(progress)
        elif progress.done:
            print(self.epoch_line(progress), file=self.stream, flush=True)

    def epoch_line(self, p: Progress) -> str:
        """One line for a finished epoch: what it did, and when the run should end at this pace."""
        done_here = p.epoch - (self.first_epoch if self.first_epoch is not None else p.epoch) + 1
        eta = (self.clock() - self.started) / done_here * (p.epochs - p.epoch - 1)
        ap = f", AP {p.ap:.4f}" if p.ap is not None else ""
        return (
            f"{self.label}epoch {p.epoch + 1}/{p.epochs}: {p.step}/{p.steps} steps, loss {p.loss:.4f}, "
            f"{p.images_per_s:.1f} images/s{ap}, ETA {tqdm.format_interval(eta)}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _show_bar(self, p: Progress) -> None:
        if self._bar is None or self._bar_epoch != p.epoch:
            self.close()
            desc = f"{self.label}epoch {p.epoch + 1}/{p.epochs}"
            self._bar = tqdm(  # mininterval 0: the updates come twice a second at most already
                total=p.steps, desc=desc, unit="step", file=self.stream, dynamic_ncols=True, mininterval=0
            )
            self._bar_epoch = p.epoch
        postfix = {"loss": f"{p.loss:.4f}", "images/s": f"{p.images_per_s:.1f}"}
        if p.ap is not None:
            postfix["AP"] = f"{p.ap:.4f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(max(0, p.step - self._bar.n))
        if p.done:
            self.close()


@contextmanager
def follow_progress(
    display: ProgressDisplay, tracker: Tracker | None, run_id: str, *, poll_s: float = 0.5
) -> Iterator[Any]:
    """A ProgressBoard on this node, followed by a thread until the block ends (then drained); yields
    the board for the workers. Step posts go to `tracker` as `loss_step`; trouble is logged, never raised."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    board = ProgressBoard.options(scheduling_strategy=here).remote()
    stop, warned = threading.Event(), []

    def deliver() -> None:
        try:
            for progress in ray.get(board.take.remote(), timeout=30):
                display.show(progress)
                if tracker is not None and not progress.done:
                    tracker.log_metrics(run_id, {STEP_LOSS: progress.loss}, progress.global_step)
        except Exception as exc:  # progress must never stop training
            if not warned:
                logger.warning("training progress of run %s: %s: %s", run_id, type(exc).__name__, exc)
                warned.append(exc)

    def follow() -> None:
        while not stop.wait(poll_s):
            deliver()

    thread = threading.Thread(target=follow, name="retinaops-progress", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join()
        deliver()
        display.close()
        try:
            ray.kill(board)
        except Exception:  # Ray already shut down (an interrupted run): the board went with it
            pass
