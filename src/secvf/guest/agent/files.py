"""Upload and download streams; each opens its file as the requested user."""

from __future__ import annotations

import errno
import functools
import os
import stat
import threading
from typing import TYPE_CHECKING, Any

from secvf.exec import protocol
from secvf.guest.agent.connection import ConnectionGone
from secvf.guest.agent.errors import RequestFailed
from secvf.guest.agent.identity import Identity, call_as, default_cwd, resolve_identity

if TYPE_CHECKING:
    from secvf.guest.agent.session import Session

DEFAULT_NEW_FILE_MODE = 0o644


def _file_failure(exc: OSError, path: str) -> RequestFailed:
    kind = {
        errno.ENOENT: "not_found",
        errno.ENOTDIR: "not_found",
        errno.EISDIR: "is_a_directory",
        errno.EACCES: "permission_denied",
        errno.EPERM: "permission_denied",
    }.get(exc.errno or 0, "other")
    return RequestFailed(kind, exc.strerror or "failed", exc.errno, path=path)


class UploadTask:
    """One upload: a temporary file opened as the user, renamed into place at the end."""

    def __init__(self, session: Session, stream_id: int, request: dict[str, Any]) -> None:
        self.session = session
        self.stream_id = stream_id
        self.request = request
        self.identity: Identity | None = None
        self.path = ""
        self.tmp_path = ""
        self.fd: int | None = None
        self.size = 0

    def start(self) -> None:
        """Open the temporary file as the user and send ``upload_ready``.

        Raises:
            RequestFailed: unknown user, bad path, no permission.
        """
        self.identity = resolve_identity(self.request["user"] or self.session.agent.default_user)
        self.path = os.path.join(default_cwd(self.identity), self.request["path"])
        if os.path.isdir(self.path):
            raise RequestFailed("is_a_directory", "is a directory", errno.EISDIR, path=self.path)
        directory, name = os.path.split(self.path)
        self.tmp_path = os.path.join(directory, f".{name}.secvf-upload-{os.getpid()}-{id(self)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            self.fd = call_as(self.identity, lambda: os.open(self.tmp_path, flags, 0o600))
        except OSError as exc:
            raise _file_failure(exc, self.path) from exc
        self.session.conn.message("upload_ready", self.stream_id)

    def write_chunk(self, data: bytes | memoryview) -> None:
        """Append one FILE_DATA chunk (written before this returns; ``data`` is not kept)."""
        assert self.fd is not None
        try:
            self._write_all(data)
        except OSError as exc:
            self._fail(_file_failure(exc, self.path))

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]  # type: ignore[arg-type]
        self.size += len(data)

    def finish(self) -> None:
        """Apply the mode, rename into place, send ``upload_done``."""
        assert self.fd is not None and self.identity is not None
        mode = self.request["mode"]
        try:
            if mode is None:
                mode = _existing_mode(self.path, DEFAULT_NEW_FILE_MODE)
            os.fchmod(self.fd, mode & 0o7777)
            os.close(self.fd)
            self.fd = None
            call_as(self.identity, lambda: os.rename(self.tmp_path, self.path))
        except OSError as exc:
            self._fail(_file_failure(exc, self.path))
            return
        self.session.conn.message(
            "upload_done", self.stream_id, path=self.path, size=self.size, mode=mode & 0o7777
        )
        self.session.stream_ended(self.stream_id)

    def _fail(self, failure: RequestFailed) -> None:
        self.abort()
        fields = {"kind": failure.kind, "path": self.path, **failure.fields()}
        self.session.conn.message("file_error", self.stream_id, **fields)
        self.session.stream_ended(self.stream_id)

    def abort(self) -> None:
        """Close and remove the temporary file."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass


def _existing_mode(path: str, fallback: int) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return fallback


class DownloadTask:
    """One download: open as the user, stream FILE_DATA chunks in a thread."""

    def __init__(self, session: Session, stream_id: int, request: dict[str, Any]) -> None:
        self.session = session
        self.stream_id = stream_id
        self.request = request
        self._aborted = threading.Event()

    def start(self) -> None:
        """Open the file and start the sending thread.

        Raises:
            RequestFailed: unknown user, missing file, directory, no permission.
        """
        identity = resolve_identity(self.request["user"] or self.session.agent.default_user)
        path = os.path.join(default_cwd(identity), self.request["path"])
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = call_as(identity, lambda: os.open(path, flags))
        except OSError as exc:
            raise _file_failure(exc, path) from exc
        assert fd is not None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            if stat.S_ISDIR(info.st_mode):
                raise RequestFailed("is_a_directory", "is a directory", errno.EISDIR, path=path)
            raise RequestFailed("not_regular_file", "not a regular file", path=path)
        os.set_blocking(fd, True)
        mode = stat.S_IMODE(info.st_mode)
        self.session.conn.message(
            "download_start", self.stream_id, path=path, size=info.st_size, mode=mode
        )
        self.session.agent.workers.run(functools.partial(self._bh_send, fd))

    def _bh_send(self, fd: int) -> None:
        sent = 0
        try:
            while not self._aborted.is_set():
                chunk = os.read(fd, protocol.DATA_CHUNK_BYTES)
                if not chunk:
                    break
                frame = protocol.encode_data(protocol.FrameType.FILE_DATA, self.stream_id, chunk)
                self.session.conn.send(frame)
                sent += len(chunk)
            self.session.conn.message("download_end", self.stream_id, size=sent)
        except ConnectionGone:
            pass
        except OSError as exc:
            failure = _file_failure(exc, self.request["path"])
            self._send_error(failure)
        finally:
            os.close(fd)
            self.session.stream_ended(self.stream_id)

    def _send_error(self, failure: RequestFailed) -> None:
        try:
            fields = {"kind": failure.kind, "path": failure.path, **failure.fields()}
            self.session.conn.message("file_error", self.stream_id, **fields)
        except ConnectionGone:
            pass

    def abort(self) -> None:
        """Stop sending."""
        self._aborted.set()
