"""One attach stream: a background process's buffered output, then its live output, to
its ``exit``.

The stream starts with ``attached`` (``dropped_bytes``: output the process's ring had
dropped before this attach began), then STDOUT/STDERR frames from the oldest byte kept,
then live ones as the process writes, and ends with ``exit`` once the process has ended
and every byte kept has been sent. An attach to a process that has exited sends what is
kept and the ``exit`` at once.

Each attach has its own thread and its own position in the ring. Its sends block while
its client does not read; the process is never held up by that (its pump only writes to
the ring), and the ring does not grow either: when the ring drops bytes this attacher
had not sent yet, they are skipped and reported with ``output_dropped`` (the count).
So a slow attacher costs at most one read (:data:`ATTACH_READ_BYTES`) of memory, and
other attachers of the same process are not affected. Ending the connection ends the
attach, never the process.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from secvf.exec import protocol
from secvf.guest.agent.connection import ConnectionGone

if TYPE_CHECKING:
    from secvf.guest.agent.detached import DetachedProcess
    from secvf.guest.agent.session import Session

#: Most output bytes one attach takes from the ring at a time (its memory bound).
ATTACH_READ_BYTES = 256 * 1024


class AttachTask:
    """One ``attach`` stream of a session, following one background process."""

    def __init__(self, session: Session, stream_id: int, request: dict[str, Any]) -> None:
        self.session = session
        self.conn = session.conn
        self.stream_id = stream_id
        self.request = request
        self.process: DetachedProcess | None = None
        self._stop = threading.Event()

    def __repr__(self) -> str:
        return f"<AttachTask stream={self.stream_id} process={self.request['id']!r}>"

    def start(self) -> None:
        """Find the process and start following it.

        Raises:
            DetachedRefused: ``not_found`` or ``limit_reached`` (sent as detached_error).
        """
        self.process = self.session.agent.detached.attach(self.request["id"])
        self.session.agent.workers.run(self._bh_follow)

    def _bh_follow(self) -> None:
        process = self.process
        assert process is not None
        ring, sid = process.output, self.stream_id
        try:
            offset = ring.start
            running = process.outcome is None
            self.conn.message(
                "attached",
                sid,
                id=process.id,
                pid=process.proc.pid if process.proc is not None else 0,
                state="running" if running else "exited",
                dropped_bytes=offset,
            )
            while not self._stop.is_set():
                pieces, offset, skipped, eof = ring.read(offset, ATTACH_READ_BYTES, self._stop)
                if skipped:
                    self.conn.message("output_dropped", sid, bytes=skipped)
                for frame_type, data in pieces:
                    self.conn.send_parts(protocol.data_frame_parts(frame_type, sid, data))
                if eof:
                    assert process.outcome is not None  # set before the ring is closed
                    self.conn.message("exit", sid, **process.outcome)
                    break
        except ConnectionGone:
            pass  # the client left: the process carries on
        finally:
            self.session.agent.detached.release(process)
            self.session.stream_ended(sid)

    def abort(self) -> None:
        """The connection is gone: stop following (the process keeps running)."""
        self._stop.set()
        if self.process is not None:
            self.process.output.wake()
