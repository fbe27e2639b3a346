"""Learning-rate schedules: PyTorch's closed forms, stepped once per iteration by the trainer.

A schedule sets `optimizer.lr`; its state (the iteration count and base lr) goes in checkpoints.
"""
import math

from ddl.optim import _nonneg


class LRScheduler:
    """Sets `optimizer.lr = lr_at(last_epoch)`; the base class keeps it constant at `base_lr`.

    As in PyTorch, construction sets the lr for t = 0 and each `step()` advances t by one and sets
    the next lr. Whether t counts epochs or iterations is the caller's choice; the trainer (through
    `make_schedule`) steps once per iteration, after `optimizer.step`.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.base_lr = float(optimizer.lr)
        self.last_epoch = 0
        optimizer.lr = self.get_lr()

    def lr_at(self, t):
        return self.base_lr

    def get_lr(self):
        return self.lr_at(self.last_epoch)

    def step(self):
        self.last_epoch += 1
        self.optimizer.lr = self.get_lr()

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "base_lr": self.base_lr}

    def load_state_dict(self, sd):
        self.last_epoch = int(sd["last_epoch"])
        self.base_lr = float(sd["base_lr"])
        self.optimizer.lr = self.get_lr()


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (t // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        if int(step_size) != step_size or step_size < 1:
            raise ValueError(f"invalid step_size: {step_size} (must be a positive integer)")
        _nonneg(gamma=gamma)
        self.step_size, self.gamma = int(step_size), float(gamma)
        super().__init__(optimizer)

    def lr_at(self, t):
        return self.base_lr * self.gamma ** (t // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2.

    PyTorch's closed form: past T_max the cosine carries on (the lr rises again), so size T_max
    to the whole run.
    """

    def __init__(self, optimizer, T_max, eta_min=0.0):
        if T_max <= 0:
            raise ValueError(f"invalid T_max: {T_max} (must be > 0)")
        _nonneg(eta_min=eta_min)
        self.T_max, self.eta_min = T_max, float(eta_min)
        super().__init__(optimizer)

    def lr_at(self, t):
        cos = (1 + math.cos(math.pi * t / self.T_max)) / 2
        return self.eta_min + (self.base_lr - self.eta_min) * cos


class LinearWarmup(LRScheduler):
    """Multiplies another schedule by a factor rising linearly from `start_factor` to 1 over
    `warmup_steps` (PyTorch's LinearLR chained with it): the usual guard for the large effective
    batches of data-parallel training (Goyal et al., 2017).

    factor(t) = start_factor + (1 - start_factor) * min(t, warmup_steps) / warmup_steps.
    Step only the wrapper; the wrapped schedule is read through its `lr_at`.
    """

    def __init__(self, after, warmup_steps, start_factor=0.1):
        if int(warmup_steps) != warmup_steps or warmup_steps < 1:
            raise ValueError(f"invalid warmup_steps: {warmup_steps} (must be a positive integer)")
        if not 0 < start_factor <= 1:
            raise ValueError(f"invalid start_factor: {start_factor} (must be in (0, 1])")
        self.after, self.warmup_steps, self.start_factor = after, int(warmup_steps), start_factor
        super().__init__(after.optimizer)
        self.base_lr = after.base_lr

    def lr_at(self, t):
        frac = min(t, self.warmup_steps) / self.warmup_steps
        return self.after.lr_at(t) * (self.start_factor + (1 - self.start_factor) * frac)

    def load_state_dict(self, sd):
        self.after.base_lr = float(sd["base_lr"])
        super().load_state_dict(sd)


# The CLI's schedules over T iterations: name -> make(optimizer, T). A new one is one line here.
SCHEDULES = {
    "constant": lambda optimizer, total: LRScheduler(optimizer),
    "step": lambda optimizer, total: StepLR(optimizer, step_size=math.ceil(total / 3), gamma=0.1),
    "cosine": lambda optimizer, total: CosineAnnealingLR(optimizer, T_max=total),
}


def make_schedule(name, optimizer, epochs, steps_per_epoch, warmup_steps=0):
    """The CLI's schedule `name` (a key of SCHEDULES), to be stepped once per ITERATION (after
    each optimizer step).

    With T = epochs * steps_per_epoch iterations and lr0 = optimizer.lr:
      "constant": lr0 throughout.
      "step":     lr0 * 0.1 ** (t // ceil(T / 3)): divided by 10 after each third of the run.
      "cosine":   lr0 * (1 + cos(pi * t / T)) / 2, from lr0 down towards 0 at the end.
    warmup_steps > 0 wraps it in LinearWarmup (factor 0.1 -> 1 over that many iterations).
    """
    total = epochs * steps_per_epoch
    if total < 1:
        raise ValueError(f"need at least one iteration, got epochs={epochs}, "
                         f"steps_per_epoch={steps_per_epoch}")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    schedule = SCHEDULES[name](optimizer, total)
    return LinearWarmup(schedule, warmup_steps) if warmup_steps else schedule
