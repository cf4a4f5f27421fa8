"""A pickle's bytes for :mod:`ema_average.checkpoints.reading.pickle_scan`: read a chunk at a time (a streamed
``.metadata`` is never held whole), long strings passed over unread, the file left just past the pickle."""

from __future__ import annotations

from typing import IO

CHUNK = 1 << 20  # bytes read at a time
SLACK = 16  # bytes a fast-path opcode reads at most, past its first (the buffer keeps this many ahead)


class PickleRefused(ValueError):
    """The pickle cannot or may not be read; ``unsafe``: refused as unreadable by the safe reader (a newer
    protocol), not as damage."""

    def __init__(self, message: str, *, unsafe: bool = False) -> None:
        super().__init__(message)
        self.unsafe = unsafe


class PickleSource:
    """The pickle's bytes, a chunk at a time; ``pos`` in ``buf``, ``end`` its last real byte (at the end of
    the file, ``buf`` is padded with ``SLACK`` zeros so that the loop need not check each read)."""

    def __init__(self, file: IO[bytes], size: int, what: str) -> None:
        self.file, self.size, self.what = file, size, what
        self.buf, self.pos, self.end, self.eof = b"", 0, 0, False
        self.refill()

    def refill(self) -> None:
        """Keep the unread bytes and read the next chunk; ``limit`` is where the loop must come back."""
        more = self.file.read(CHUNK) if not self.eof else b""
        self.buf = self.buf[self.pos : self.end] + more
        self.pos, self.end = 0, len(self.buf)
        if len(more) < CHUNK:
            self.eof = True
            self.buf += bytes(SLACK)
        self.limit = self.end if self.eof else self.end - SLACK

    def skip(self, count: int) -> None:
        """Pass ``count`` bytes from ``pos`` (a long string), reading the file on where the buffer ends."""
        left = self.end - self.pos
        if count <= left:
            self.pos += count
            return
        count -= left
        self.pos = self.end
        while count and not self.eof:
            got = self.file.read(min(count, CHUNK))
            if len(got) < min(count, CHUNK):
                self.eof = True
            count -= len(got)
        if count:
            raise self.ended()
        self.refill()

    def give_back(self) -> None:
        """Leave the file just past the pickle (a legacy torch file holds several in a row)."""
        if self.end > self.pos:
            self.file.seek(self.pos - self.end, 1)

    def line(self) -> bytes:
        """The bytes up to the next newline (a text opcode's argument), the newline passed."""
        while True:
            at = self.buf.find(b"\n", self.pos, self.end)
            if at >= 0:
                text, self.pos = self.buf[self.pos : at + 1], at + 1
                return text
            if self.eof:
                raise self.ended()
            self.refill()

    def take(self, count: int) -> bytes:
        """``count`` bytes from ``pos`` (the argument of a rare opcode)."""
        short = count - (self.end - self.pos)
        if short > 0 and not self.eof:
            more = self.file.read(short + CHUNK)
            self.buf = self.buf[self.pos : self.end] + more
            self.pos, self.end = 0, len(self.buf)
            if len(more) < short + CHUNK:
                self.eof = True
                self.buf += bytes(SLACK)
            self.limit = self.end if self.eof else self.end - SLACK
        data, self.pos = self.buf[self.pos : self.pos + count], self.pos + count
        if self.pos > self.end:
            raise self.ended()
        return data

    def damaged(self, why: str) -> PickleRefused:
        return PickleRefused(f"is damaged or not {self.what} ({why})")

    def ended(self) -> PickleRefused:
        return self.damaged("its pickle ends early")
