"""A local HTTP server that answers every request with one status and body (no MLflow there), counting
requests: a misbehaving tracking server for the tests (importable from tests/unit and tests/integration,
whose conftest folder, tests/, pytest puts on sys.path)."""

from __future__ import annotations

import http.server
import threading


class Answering(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, status: int, body: bytes = b"<html>\n<body>no MLflow here</body>\n</html>\n") -> None:
        self.status, self.body, self.requests = status, body, 0
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.server.requests += 1
        self.send_response(self.server.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass
