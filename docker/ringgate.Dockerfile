# ringgate: the gateway, one statically linked binary in an empty image.
#
# Built by `make images` (which runs `make static` first) from the repository root, with the
# build context trimmed by .dockerignore. FROM scratch: building never pulls anything.
#
# The config and policies baked in here are the defaults; docker-compose.yml bind-mounts the
# host's conf/ and policies/ over them so edits on the host apply live.
# ringgate-server is included too, so that `docker run ringgate` without the Docker socket still
# works (provider auto falls back to local processes inside the container).
FROM scratch
COPY target/static/x86_64-unknown-linux-gnu/release/ringgate /ringgate
COPY target/static/x86_64-unknown-linux-gnu/release/ringgate-server /ringgate-server
WORKDIR /app
COPY conf/lb.toml /app/conf/lb.toml
COPY policies/ /app/policies/
EXPOSE 5000
STOPSIGNAL SIGTERM
# ringgate.image marks images built here, so `make clean` finds old untagged builds too.
LABEL ringgate.image="ringgate" \
      org.opencontainers.image.title="ringgate" \
      org.opencontainers.image.description="ringgate load-balancing gateway"
ENTRYPOINT ["/ringgate", "serve", "--config", "/app/conf/lb.toml"]
