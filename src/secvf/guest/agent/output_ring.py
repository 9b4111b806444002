"""A background process's output buffer: its last bytes, stdout and stderr in order.

Positions are *offsets* in the process's whole output since it started (stdout and
stderr counted together, in the order the agent read them): byte 0 is its first byte
ever. The ring keeps the bytes from :attr:`OutputRing.start` to :attr:`OutputRing.end`;
everything before ``start`` was dropped to stay within the cap, so ``start`` *is* the
number of bytes dropped. A reader (an attach stream) keeps its own offset; when the ring
has dropped bytes the reader had not read yet, :meth:`OutputRing.read` skips them and
says how many (the reader reports that, it is never silent).

Memory: at most ``capacity`` bytes of data in at most ``max_pieces`` pieces (a piece is
one run of same-stream output; consecutive reads of one stream are merged up to
:data:`MERGE_BYTES`), whatever the process writes and however slowly readers read.
"""

from __future__ import annotations

import collections
import threading

from secvf.exec import protocol

#: Consecutive output of one stream is merged into one piece up to this size.
MERGE_BYTES = 64 * 1024


class _Piece:
    """One run of output of one stream: its offset, its stream and its bytes."""

    __slots__ = ("offset", "frame_type", "data")

    def __init__(self, offset: int, frame_type: protocol.FrameType, data: bytes) -> None:
        self.offset = offset
        self.frame_type = frame_type
        self.data = data


class OutputRing:
    """The last ``capacity`` bytes of output (and at most ``max_pieces`` pieces); thread-safe.

    One writer (the process's pump) :meth:`append`\\ s; any number of readers
    :meth:`read` from offsets of their own, waiting for more; :meth:`close` marks the
    end of the output.
    """

    def __init__(self, capacity: int, max_pieces: int) -> None:
        if capacity <= 0 or max_pieces <= 0:
            raise ValueError("capacity and max_pieces must be positive")
        self.capacity = capacity  # most bytes kept
        self.max_pieces = max_pieces  # most separate pieces kept
        self._pieces: collections.deque[_Piece] = collections.deque()
        self._start = 0  # offset of the oldest byte kept (= bytes dropped so far)
        self._end = 0  # offset after the newest byte (= bytes written so far)
        self._closed = False
        self._cond = threading.Condition()

    def __repr__(self) -> str:
        return f"<OutputRing {self._start}..{self._end} pieces={len(self._pieces)}>"

    @property
    def start(self) -> int:
        """Offset of the oldest byte kept: the number of bytes dropped so far."""
        with self._cond:
            return self._start

    @property
    def end(self) -> int:
        """Offset after the newest byte: the number of bytes written so far."""
        with self._cond:
            return self._end

    @property
    def buffered(self) -> int:
        """Bytes kept now."""
        with self._cond:
            return self._end - self._start

    def append(self, frame_type: protocol.FrameType, data: bytes) -> None:
        """Add output of one stream; drop the oldest bytes beyond the caps. Never blocks
        for long (no reader can hold it up)."""
        if not data:
            return
        with self._cond:
            if len(data) >= self.capacity:  # only its tail survives, and nothing before it
                self._end += len(data) - self.capacity
                data = data[-self.capacity :]
                self._pieces.clear()
                self._start = self._end
            last = self._pieces[-1] if self._pieces else None
            if (
                last is not None
                and last.frame_type is frame_type
                and len(last.data) + len(data) <= MERGE_BYTES
            ):
                last.data += data
            else:
                self._pieces.append(_Piece(self._end, frame_type, data))
            self._end += len(data)
            self._trim()
            self._cond.notify_all()

    def _trim(self) -> None:
        """Drop from the front until both caps hold (lock held)."""
        while self._end - self._start > self.capacity or len(self._pieces) > self.max_pieces:
            first = self._pieces[0]
            excess = self._end - self._start - self.capacity
            if len(self._pieces) > self.max_pieces or excess >= len(first.data):
                self._pieces.popleft()
                self._start = first.offset + len(first.data)
            else:
                first.data = first.data[excess:]
                first.offset += excess
                self._start = first.offset

    def close(self) -> None:
        """No more output will come; readers at the end see EOF."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake every waiting reader (one whose ``stop`` was just set returns)."""
        with self._cond:
            self._cond.notify_all()

    def read(
        self, offset: int, limit: int, stop: threading.Event
    ) -> tuple[list[tuple[protocol.FrameType, bytes]], int, int, bool]:
        """Wait until there is output at or after ``offset``, the output ended, or ``stop``
        is set (then :meth:`wake`); return what there is, at most ``limit`` bytes.

        Returns:
            ``(pieces, next_offset, skipped, eof)``: ``(stream, bytes)`` pairs in order;
            the offset to read from next; how many bytes before it were dropped before
            this reader got them; and whether the output has ended and all of it is read.
        """
        with self._cond:
            while offset >= self._end and not self._closed and not stop.is_set():
                self._cond.wait()
            skipped = max(0, self._start - offset)
            offset += skipped
            out: list[tuple[protocol.FrameType, bytes]] = []
            room = limit
            for piece in self._pieces:
                piece_end = piece.offset + len(piece.data)
                if piece_end <= offset:
                    continue
                begin = offset - piece.offset
                chunk = piece.data[begin : begin + room]
                out.append((piece.frame_type, chunk))
                offset += len(chunk)
                room -= len(chunk)
                if room <= 0:
                    break
            return out, offset, skipped, self._closed and offset >= self._end
