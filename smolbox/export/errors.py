"""The export stage's one error type (every step raises it; the CLI prints its message and exits 2)."""


class ExportError(RuntimeError):
    """An export that cannot go on; the message says what to do."""
