"""The one base class of errors a user can cause and fix.

A `CxrliteError` means bad input, not a bug: a file that is not what it claims, an option
that does not fit, a bundle that fails verification, a missing optional package. The CLI
prints its message as one line (it names the file or option and the fix) and exits non-zero;
the server turns the ones a request can cause into a 4xx. Anything else keeps its traceback.
Each module's error also derives from the builtin it used to be (ValueError, RuntimeError), so
`except ValueError` around a call keeps working.
"""

from __future__ import annotations


class CxrliteError(Exception):
    """A user-facing error; its message names what is wrong and how to fix it."""
