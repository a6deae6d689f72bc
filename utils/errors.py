"""The one way to report a user's mistake: raise ``UserError`` (or a subclass) with one line that names the flag or
file and says what to do. The launcher catches it once, prints ``<script>: error: <message>`` and exits with its
``exit_code``: 2 for usage (a flag or a combination of flags, as argparse does), 1 for data (a file, a folder, the
contents of either). No traceback: the message is the whole report."""
from __future__ import annotations


class UserError(Exception):
    """Wrong input data: a missing or damaged file, a folder that does not fit (exit code 1)."""

    exit_code = 1


class UsageError(UserError):
    """Wrong flags: a value or a combination the run cannot use (exit code 2, as argparse's own errors)."""

    exit_code = 2
