"""Errors the CLI turns into one clear line on stderr and exit code 2."""


class KvtError(Exception):
    """A user-facing error: bad config, bad input, unknown task. CLI exit code 2."""

    exit_code = 2


class ConfigError(KvtError):
    """Invalid configuration; the message names the dotted key path or the file."""


class DataError(KvtError):
    """Invalid or unavailable dataset input; the message names the file/task."""


class ManifestError(KvtError):
    """A manifest that does not match its hash or its database copy."""
