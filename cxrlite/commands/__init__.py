"""Click subcommand groups of the `cxrlite` CLI, one module per group."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import click

logger = logging.getLogger(__name__)

# Errors a user can cause (bad file, bad argument, bad data): shown as one clear line, exit 1.
# Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user-caused exception into a click error message instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("details", exc_info=True)
            raise click.ClickException(str(e)) from None

    return wrapper
