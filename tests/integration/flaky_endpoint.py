"""A fault-injecting HTTP forwarder for the reliability integration tests (test_reliability_services.py,
test_reliability_s3.py): it sits on a fixed 127.0.0.1 port in front of a real service."""

import socket
import threading
import time

from retinaops.cluster.services import free_port


class FlakyEndpoint:
    """An HTTP/1.1 forwarder on a fixed 127.0.0.1 port in front of a real service, to inject faults.

    refuse(): the port is closed and open connections are cut (connection refused); fail(pattern):
    requests whose request line contains pattern get 503; cut(pattern, after, times): the next `times`
    such requests get the first `after` bytes of the real response (head and a part of the body), then
    the connection is closed: a transfer broken off midway; slow(pattern, seconds): such requests wait
    that long first; heal(): all is forwarded again, same port. `seen` lists every request line.
    """

    def __init__(self, target_url: str) -> None:
        self.target = ("127.0.0.1", int(target_url.rsplit(":", 1)[1]))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.failing: str | None = None
        self.num_failed = 0
        self.failed: list[str] = []  # the request lines answered 503
        self.seen: list[str] = []  # every request line, in order
        self.cuts: list[str] = []  # the request lines whose response was cut short
        self._cut: tuple[str, int, int] | None = None  # (pattern, bytes let through, cuts left)
        self._slow: tuple[str, float] | None = None
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.heal()

    def heal(self) -> None:
        self.failing, self._cut, self._slow = None, None, None
        if self._listener is None:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def refuse(self) -> None:
        if self._listener is not None:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
            self._listener.close()
            self._listener = None
        for client in list(self._clients):
            client.close()

    def fail(self, pattern: str = "") -> None:
        self.failing = pattern

    def cut(self, pattern: str, after: int, times: int) -> None:
        self._cut = (pattern, after, times)

    def slow(self, pattern: str, seconds: float) -> None:
        self._slow = (pattern, seconds)

    def _take_cut(self, line: str) -> int | None:
        """Bytes to let through when this request's response is to be cut, else None."""
        with self._lock:
            self.seen.append(line)
            if self._cut is None or self._cut[0] not in line or self._cut[2] <= 0:
                return None
            pattern, after, left = self._cut
            self._cut = (pattern, after, left - 1)
            self.cuts.append(line)
            return after

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self._clients.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        reader = client.makefile("rb")
        try:
            while head := _read_head(reader):
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                if self._slow is not None and self._slow[0] in line:
                    time.sleep(self._slow[1])
                if (after := self._take_cut(line)) is not None:
                    _forward_cut(self.target, head, client, after)  # then this connection is closed
                    break
                if self.failing is not None and self.failing in line:
                    self.num_failed += 1
                    self.failed.append(line)
                    client.sendall(
                        b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    break
                upstream.sendall(head)  # before the body: a client may wait for "100 Continue"
                _copy_body(reader, upstream, head)
        except OSError:
            pass
        finally:
            self._clients.discard(client)
            for s in (client, upstream):
                s.close()


def _forward_cut(target: tuple[str, int], head: bytes, client: socket.socket, after: int) -> None:
    """A bodiless request (GET, HEAD) sent on a connection of its own; its response passed on up to
    `after` bytes."""
    with socket.create_connection(target) as side:
        side.sendall(head)
        while after > 0 and (data := side.recv(min(after, 1 << 16))):
            client.sendall(data)
            after -= len(data)


def _read_head(reader) -> bytes:
    lines = []
    while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
        lines.append(line)
    return b"".join(lines) + b"\r\n" if lines else b""


def _copy_body(reader, upstream: socket.socket, head: bytes) -> None:
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])
    }
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size_line = reader.readline()
            size = int(size_line.split(b";")[0], 16)
            upstream.sendall(size_line + reader.read(size + 2))
            if size == 0:
                return
    remaining = int(headers.get(b"content-length", b"0"))
    while remaining:
        chunk = reader.read(min(remaining, 1 << 16))
        upstream.sendall(chunk)
        remaining -= len(chunk)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
