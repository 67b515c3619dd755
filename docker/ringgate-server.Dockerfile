# ringgate-server: the demo backend replica, one statically linked binary in an empty image.
#
# Built by `make images` (which runs `make static` first) from the repository root, with the
# build context trimmed by .dockerignore. FROM scratch: building never pulls anything, so it works
# without a registry.
FROM scratch
COPY target/static/x86_64-unknown-linux-gnu/release/ringgate-server /ringgate-server
# The docker provider sets SERVER_ID and PORT on every replica; these are the defaults.
ENV SERVER_ID=unknown PORT=5000
EXPOSE 5000
# No shell in the image: the binary checks its own /heartbeat (exit 0 on a 200).
HEALTHCHECK --interval=5s --timeout=2s --start-period=1s --retries=2 \
  CMD ["/ringgate-server", "--check"]
# ringgate-server exits cleanly on SIGTERM, which matters as PID 1.
STOPSIGNAL SIGTERM
# ringgate.image marks images built here, so `make clean` finds old untagged builds too;
# ringgate.server-features lets the tests tell an image built before a feature they need.
LABEL ringgate.image="ringgate-server" \
      ringgate.server-features="check ws" \
      org.opencontainers.image.title="ringgate-server" \
      org.opencontainers.image.description="ringgate demo backend replica: GET /home, GET /heartbeat, GET /ws (WebSocket echo)"
ENTRYPOINT ["/ringgate-server"]
