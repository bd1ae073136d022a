"""Training progress in the driver: a tqdm bar per epoch on a terminal, one plain line per epoch otherwise."""

import io

from retinaops.run.progress import Progress, ProgressDisplay


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def step(epoch: int, n: int, loss: float = 0.5, **changes) -> Progress:
    fields = dict(epoch=epoch, epochs=3, step=n, steps=10, global_step=epoch * 10 + n, loss=loss)
    return Progress(**{**fields, "images_per_s": 12.0, **changes})


def test_a_terminal_gets_a_bar_with_the_epoch_the_step_of_steps_loss_images_per_s_and_eta():
    out = Terminal()
    display = ProgressDisplay(out)
    display.show(step(0, 4))
    text = out.getvalue()
    assert display.bar and "epoch 1/3" in text and "4/10" in text
    assert "loss=0.5000" in text and "images/s=12.0" in text
    assert "<" in text  # tqdm's [elapsed<remaining]


def test_a_terminal_bar_ends_with_its_epoch_and_the_next_epoch_gets_its_own():
    out = Terminal()
    display = ProgressDisplay(out)
    display.show(step(0, 10, loss=0.25, done=True, ap=0.125))
    display.show(step(1, 2))
    display.close()
    first, second = (line.split("\r")[-1] for line in out.getvalue().split("\n")[:2])  # as last drawn
    assert "epoch 1/3" in first and "10/10" in first and "AP=0.1250" in first
    assert "epoch 2/3" in second and "2/10" in second


def test_without_a_terminal_each_epoch_is_one_plain_line_with_the_runs_eta():
    out, clock = io.StringIO(), Clock()
    display = ProgressDisplay(out, label="trial t1 ", clock=clock)
    for n in (3, 6, 9):
        display.show(step(0, n))
    assert out.getvalue() == ""  # steps show on a terminal only
    clock.now = 30.0  # one epoch in 30 s: two more take a minute
    display.show(step(0, 10, loss=0.4, images_per_s=20.0, done=True, ap=0.1234))
    display.show(step(1, 5))
    assert display.bar is False
    assert out.getvalue() == (
        "trial t1 epoch 1/3: 10/10 steps, loss 0.4000, 20.0 images/s, AP 0.1234, ETA 01:00\n"
    )


def test_an_epoch_without_evaluation_has_no_ap_and_the_last_epoch_no_time_left():
    out, clock = io.StringIO(), Clock()
    display = ProgressDisplay(out, clock=clock)
    clock.now = 20.0
    display.show(step(1, 10, done=True))  # a run resumed at epoch 1: its pace is counted from there
    clock.now = 30.0
    display.show(step(2, 10, done=True))
    assert out.getvalue().splitlines() == [
        "epoch 2/3: 10/10 steps, loss 0.5000, 12.0 images/s, ETA 00:20",
        "epoch 3/3: 10/10 steps, loss 0.5000, 12.0 images/s, ETA 00:00",
    ]
