"""The exception hierarchy: one base class, one subclass per kind of failure a user can act on."""

from __future__ import annotations


class FedloraError(Exception):
    """Base class of every error fedlora raises on purpose."""


class ConfigError(FedloraError):
    """A configuration key is missing, unknown or has an impossible value.

    The message names the key (``section.key``), the value and what was expected.
    """


class DataError(FedloraError):
    """A data file is missing, empty, malformed or does not fit the task."""


class ModelError(FedloraError):
    """A base model cannot be found or loaded, or does not fit the task."""


class FingerprintMismatch(FedloraError):
    """The base model at a site differs from the coordinator's."""

    def __init__(self, expected: str, actual: str, where: str = "site") -> None:
        super().__init__(
            f"base model fingerprint mismatch at {where}: coordinator expects {expected}, "
            f"this model is {actual}; load the same base model (same weights, config and "
            "tokenizer) as the coordinator"
        )
        self.expected = expected
        self.actual = actual


class UpdateRejected(FedloraError):
    """A site's reply cannot be used for aggregation; the message says why."""


class RegistryError(FedloraError):
    """A registry folder is missing files, tampered with, or would be overwritten."""


class StorageError(FedloraError):
    """The run folder cannot be written (disk full, I/O error): the run stops; ``--resume``
    continues from the last checkpoint once it can be written again."""
