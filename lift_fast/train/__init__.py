"""Training: the loop, checkpoints, optimiser groups and schedule, process groups, device switches, logs."""


class RunFolderError(ValueError):
    """A file of a run folder (checkpoint, metrics.jsonl) that cannot be used; the message names it.

    Defined here, free of torch, so that the command line can catch it without importing torch.
    """


class NonFiniteLossError(FloatingPointError):
    """Training stopped after train.max_nonfinite steps in a row whose loss (or gradient norm) was
    NaN or infinite; the message names the step and the setting. step: the last such step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class DistributedSetupError(RuntimeError):
    """The environment asks for a distributed run that cannot start; the message names the variable."""
