"""The one error a request can end in: it becomes a start_failed or file_error message."""

from __future__ import annotations

import errno
from typing import Any


class RequestFailed(Exception):
    """A request cannot be carried out; becomes a start_failed / file_error message."""

    def __init__(
        self, kind: str, message: str, err: int | None = None, stage: str = "", path: str = ""
    ) -> None:
        super().__init__(message)
        self.kind = kind  # a START_FAILURE_KINDS or FILE_ERROR_KINDS value
        self.errno = err  # the OS errno behind the failure, if any
        self.stage = stage  # exec only: which step failed (switch_user, chdir, exec)
        self.path = path  # files only: the guest path concerned

    def fields(self) -> dict[str, Any]:
        """Return errno, errno_name and message for the wire."""
        name = errno.errorcode.get(self.errno) if self.errno is not None else None
        return {"errno": self.errno, "errno_name": name, "message": str(self)}
