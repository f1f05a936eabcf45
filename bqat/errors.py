"""Errors a user can cause. The entry point turns them into one line and a non-zero exit."""


class UserError(Exception):
    """A mistake in the command, the config or the files it names; the message says what to do."""
