"""The learning-rate schedule of the ReXNet recipe, defined in epochs so that a resume cannot break it.

timm's ``CosineLRScheduler`` as the authors ran it (``--sched cosine``, timm 2020): with t the training
progress in epochs, T = ``epochs - cooldown_epochs`` the cosine length and W the warm-up,

* t < W:       linear from ``warmup_lr`` (timm ``--warmup-lr`` 1e-4) to the peak LR,
* W <= t < T:  ``min_lr + (peak - min_lr) * (1 + cos(pi * t / T)) / 2`` (t counted from the start of the
  run, not of the cosine, as timm does),
* t >= T:      ``min_lr`` (timm ``--min-lr`` 1e-5): the 10 cool-down epochs and anything past the end;
  the cosine never climbs back.

timm steps this per epoch; here it is evaluated per iteration (t = step / iterations per epoch), the same
curve sampled finer, as PaddleClas's schedulers do. The peak is the LR per reference batch scaled
linearly to the real global batch (Goyal et al., arXiv:1706.02677).

Resume: the scheduler's state is its position in *epochs* and the shape of the schedule. Restored under
another world size or batch size, the position is rescaled to the new iterations per epoch and the peak
follows the new global batch; a different shape (epochs, warm-up, cool-down, LRs) is refused, because
continuing would jump to another curve.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict

from paddle.optimizer.lr import LRScheduler

SHAPE_KEYS = ("lr", "lr_batch_size", "warmup_lr", "min_lr", "warmup_epochs", "decay_epochs",
              "cooldown_epochs")


class ScheduleError(ValueError):
    """A checkpoint's LR schedule that cannot be continued with the current settings."""


@dataclass(frozen=True)
class Schedule:
    lr: float  # for a global batch of lr_batch_size
    lr_batch_size: int
    warmup_lr: float
    min_lr: float
    warmup_epochs: int
    decay_epochs: int  # T: the cosine ends here; the cool-down follows
    cooldown_epochs: int
    global_batch: int

    @classmethod
    def from_config(cls, optim: Dict[str, Any], epochs: int, global_batch: int) -> "Schedule":
        return cls(lr=optim["lr"], lr_batch_size=optim["lr_batch_size"], warmup_lr=optim["warmup_lr"],
                   min_lr=optim["min_lr"], warmup_epochs=optim["warmup_epochs"],
                   decay_epochs=epochs - optim["cooldown_epochs"],
                   cooldown_epochs=optim["cooldown_epochs"], global_batch=global_batch)

    @property
    def peak_lr(self) -> float:
        return self.lr * self.global_batch / self.lr_batch_size

    def lr_at(self, t: float) -> float:
        """The LR after ``t`` epochs of training."""
        if t < self.warmup_epochs:
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * t / self.warmup_epochs
        if t < self.decay_epochs:
            return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (
                1.0 + math.cos(math.pi * t / self.decay_epochs))
        return self.min_lr


class EpochScheduler(LRScheduler):
    """A Paddle LR scheduler stepped per iteration whose state is kept in epochs (see the module doc)."""

    def __init__(self, schedule: Schedule, iters_per_epoch: int) -> None:
        self.schedule = schedule
        self.iters_per_epoch = iters_per_epoch
        super().__init__(schedule.lr_at(0.0))  # calls step(): last_epoch (the step count) becomes 0

    @property
    def epochs_done(self) -> float:
        return self.last_epoch / self.iters_per_epoch

    def get_lr(self) -> float:
        return self.schedule.lr_at(self.epochs_done)

    def state_dict(self) -> Dict[str, Any]:
        return {"last_epoch": self.last_epoch, "last_lr": self.last_lr,
                "iters_per_epoch": self.iters_per_epoch, "schedule": asdict(self.schedule)}

    def set_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue at the saved position in epochs, rescaled to this run's iterations per epoch."""
        saved = state.get("schedule")
        if not isinstance(saved, dict) or "iters_per_epoch" not in state:
            raise ScheduleError("the checkpoint's LR state counts steps, not epochs (written by an older "
                                "rexnet-train), so it cannot be continued; start a new run from its "
                                "weights with Global.pretrained_model")
        mine = asdict(self.schedule)
        changed = [f"{k}: {saved.get(k)!r} in the checkpoint, {mine[k]!r} now" for k in SHAPE_KEYS
                   if saved.get(k) != mine[k]]
        if changed:
            raise ScheduleError("the LR schedule differs from the checkpoint's (" + "; ".join(changed) +
                                "), so resuming would jump to another curve. Resume with the settings "
                                "of the run (Global.epochs and the Optimizer section), or start a new run "
                                "from its weights with Global.pretrained_model")
        done = state["last_epoch"] / state["iters_per_epoch"]
        self.last_epoch = int(round(done * self.iters_per_epoch))
        self.last_lr = self.get_lr()


def build_scheduler(optim: Dict[str, Any], global_batch: int, epochs: int,
                    iters_per_epoch: int) -> EpochScheduler:
    return EpochScheduler(Schedule.from_config(optim, epochs, global_batch), iters_per_epoch)


def restore_scheduler(scheduler: EpochScheduler, checkpoint: Dict[str, Any]) -> None:
    """Position ``scheduler`` after the checkpoint's finished epochs (rescaled when the iterations per
    epoch changed); a schedule that disagrees with the checkpoint's epoch count is refused."""
    scheduler.set_state_dict(checkpoint["lr_scheduler"])
    epoch = int(checkpoint["epoch"])
    if scheduler.last_epoch != epoch * scheduler.iters_per_epoch:
        raise ScheduleError(f"the checkpoint is after epoch {epoch}, but its LR schedule is at "
                            f"{scheduler.epochs_done:.3f} epochs")
