"""Training: the loop, checkpoints, optimiser groups and schedule."""


class RunFolderError(ValueError):
    """A file of a run folder (checkpoint, metrics.jsonl) that cannot be used; the message names it.

    Defined here, free of torch, so that the command line can catch it without importing torch.
    """
