#!/usr/bin/env python3
"""A small app of your own behind ringgate (docs/deployment.md, "Your own app").

It does what ringgate asks of a replica and nothing more:
  - it listens on 127.0.0.1:$PORT (the process provider picks the port and passes it);
  - GET /healthz is its readiness: 200 once it can serve (ringgate routes to it after
    health.rise of them in a row), 503 while it cannot;
  - GET /env answers who it is and the environment it was started with, as JSON, so you can
    see what `[provider] env` gave it;
  - it stops on SIGTERM (the default for Python).

Three switches of the walkthrough's failure demos, all read from the environment:
  MODE=broken      /healthz answers 503: a spec edit with it never gets ready, so the roll stops
  FAIL_FOR=<name>  the same, for the replica of that name only
  CRASH_FOR=<name> the replica of that name exits at once, saying why on stderr
"""

import http.server
import json
import os
import sys

PORT = int(os.environ.get("PORT", "8000"))
SERVER_ID = os.environ.get("SERVER_ID", "unknown")

if os.environ.get("CRASH_FOR") == SERVER_ID:
    print(f"refusing to start as {SERVER_ID} (CRASH_FOR)", file=sys.stderr, flush=True)
    sys.exit(3)


def ready():
    return os.environ.get("MODE") != "broken" and os.environ.get("FAIL_FOR") != SERVER_ID


class Handler(http.server.BaseHTTPRequestHandler):
    # Keep-alive: the gateway reuses its connections to a replica.
    protocol_version = "HTTP/1.1"

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self.answer(200 if ready() else 503, {"ready": ready()})
        elif path == "/env":
            self.answer(
                200,
                {
                    "server": SERVER_ID,
                    "port": PORT,
                    "greeting": os.environ.get("GREETING", "hello"),
                    "env": dict(os.environ),
                },
            )
        else:
            self.answer(404, {"error": f"no such path: {path}"})

    def log_message(self, format, *args):
        # One line per request on stderr: ringgate keeps the last lines for its errors.
        sys.stderr.write(f"{SERVER_ID} {format % args}\n")


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.daemon_threads = True
    print(f"{SERVER_ID} serving on 127.0.0.1:{PORT}", file=sys.stderr, flush=True)
    server.serve_forever()
