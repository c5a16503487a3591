"""One exception family for everything a user can get wrong, and the exit codes the CLI maps them to.

Every input check raises (never asserts) a subclass of :class:`AtlasError`; its message names the field, the
value and the rule. ``exit_code`` is 2 for bad input or configuration, 1 for a failure while running.
"""

from __future__ import annotations


class AtlasError(Exception):
    """Base of the project's typed errors."""

    exit_code = 2


class ConfigError(AtlasError, ValueError):
    """A configuration value breaks a rule (field, value and rule are in the message)."""

    def __init__(self, field: str, value: object, rule: str):
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"{field}={value!r}: {rule}")


class InputError(AtlasError, ValueError):
    """A tensor or file given at run time does not match what the configuration expects."""


class ModelLoadError(AtlasError):
    """A model folder, weight file or adapter is missing, corrupt or does not fit the model."""


class PlanError(AtlasError):
    """A run that cannot be executed as planned (does not fit in memory, too few windows for the ranks...)."""


class RunFailure(AtlasError):
    """A failure while running (a worker died past its restart budget, a timeout); exit code 1."""

    exit_code = 1


def check(condition: bool, field: str, value: object, rule: str) -> None:
    """Raise :class:`ConfigError` unless ``condition`` holds. Use for input validation instead of ``assert``."""
    if not condition:
        raise ConfigError(field, value, rule)
