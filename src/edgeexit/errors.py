"""One root for every error edgeexit raises on purpose; the CLI prints any of them as one line, exit code 2.

EdgeExitError
├── UserError        bad input from the user (unknown name, bad path, malformed value)
├── PayloadError     an offload body that is not a valid payload (serving.wire)
├── OffloadFailed    the cloud gave no usable answer (serving.client)
└── WorkerFailed     a worker process of the sweep died or raised (evaluate.parallel)
"""

__all__ = ["EdgeExitError", "UserError"]


class EdgeExitError(Exception):
    """The root of edgeexit's own exceptions: catch this to catch them all."""


class UserError(EdgeExitError, ValueError):
    """Bad input from the user (unknown name, bad path, malformed value); the message says what is accepted."""
