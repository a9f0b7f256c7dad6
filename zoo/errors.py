"""Errors the zoo raises for bad input. The CLI prints their message on one line and exits 2."""


class ZooError(Exception):
    """Base class: a problem with the user's input, configuration or files (not a bug)."""


class ConfigError(ZooError):
    """Unknown method, unknown config key, wrong value type or value."""


class CheckpointError(ZooError):
    """A missing, corrupt or incompatible checkpoint."""


class MissingWeightsError(ZooError):
    """A pretrained file that must be fetched on an online machine first."""

    def __init__(self, what: str, path, fetch: str):
        super().__init__(f"{what} not found at {path}. On a machine with internet access, run:\n  {fetch}\n"
                         f"then copy the result to {path} (or point the config at where it is).")


class DataError(ZooError):
    """A missing, empty or corrupt dataset."""


class TrainingDiverged(ZooError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class DiskFull(ZooError):
    """A write failed because its disk is full; the message names the file and the free space."""
