"""Errors a user can hit. Each says what went wrong and how to fix it; the CLI maps them to exit codes."""

from __future__ import annotations


class LoraflowError(Exception):
    """Base class: a failure with a message written for the user."""

    exit_code = 1


class UsageError(LoraflowError):
    """The command, its arguments or the configuration are wrong (exit code 2)."""

    exit_code = 2


class DataError(LoraflowError):
    """The dataset cannot be read or does not satisfy its contract (exit code 1)."""

    exit_code = 1


class StackError(LoraflowError):
    """The local Prefect/MLflow stack cannot be started, reached or stopped."""

    exit_code = 1


class StageError(LoraflowError):
    """A pipeline stage failed a check it owns (e.g. merge tolerance exceeded)."""

    exit_code = 1


class RegistryError(LoraflowError):
    """A model-registry operation was refused: gate failed, lost a race, files missing (exit code 1)."""

    exit_code = 1
