# A third-party static web server as ringgate replicas: Debian's busybox-static `httpd` in an
# empty image (docs/deployment.md, "A container image of someone else's").
#
# Built by `make example-httpd` (docker/docker.mk), which installs busybox-static from
# Debian's packages when it is missing and copies its binary into a build context of its own,
# target/example-httpd/: FROM scratch, so nothing is pulled.
FROM scratch
COPY busybox /bin/busybox
# The content comes from a mount (provider.mounts = ["/srv/site:/www"]); the port from
# provider.container_port, passed as {port} in provider.command. These are the defaults for a
# plain `docker run`.
EXPOSE 8080
# busybox httpd installs no signal handler, and the kernel ignores a signal PID 1 does not
# handle: SIGTERM would only be followed by SIGKILL after the stop grace period (5 s). It keeps
# no state, and the gateway has drained its requests before it stops it, so it is killed at
# once.
STOPSIGNAL SIGKILL
# ringgate.image marks images built here, so `make clean` removes this one too.
LABEL ringgate.image="example-httpd" \
      org.opencontainers.image.title="ringgate-example-httpd" \
      org.opencontainers.image.description="busybox httpd from Debian's busybox-static, FROM scratch"
ENTRYPOINT ["/bin/busybox", "httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
