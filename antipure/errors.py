"""Exit codes of ``python -m antipure`` and the error that carries one."""

from __future__ import annotations

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_NO_HOST", "EXIT_BAD_WORKFLOW", "EXIT_NO_MODEL", "EXIT_NO_IMAGES",
           "RunnerError"]

EXIT_OK, EXIT_FAILED, EXIT_NO_HOST, EXIT_BAD_WORKFLOW, EXIT_NO_MODEL, EXIT_NO_IMAGES = 0, 1, 2, 3, 4, 5


class RunnerError(Exception):
    """A condition that stops the run before any image is processed; ``code`` is the exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
