"""User-facing errors.

Every error a user can cause (bad input file, bad recipe, missing package) is raised as a
`CurateError`: the CLI prints its message without a stack trace and exits with status 2.
Bugs stay ordinary exceptions so their traces remain visible.
"""

from __future__ import annotations

import click


class CurateError(click.ClickException):
    """An error caused by the user's input or environment, with a message that says how to fix it."""

    exit_code = 2


class MissingDependencyError(CurateError):
    """A system package or data source the command needs is not installed."""

    def __init__(self, what: str, install: str):
        super().__init__(f"{what} is not installed. Install it with:\n    {install}")
