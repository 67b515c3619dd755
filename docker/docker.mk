# Docker targets for ringgate: static binaries, images, the docker-compose stack.
#
# Included by the top-level Makefile (`include docker/docker.mk`) and usable on its own:
#   make -f docker/docker.mk images
# Targets: static, images, example-httpd, compose-up, logs, stop, clean (stop and clean are
# prerequisite-only aliases of docker-stop and docker-clean, so the Makefile can add its own
# recipes to them).
#
# Nothing here pulls from a registry: both images are FROM scratch around static binaries.
# Everything ringgate creates carries the label ringgate.managed=true; `clean` removes exactly
# that (containers, networks) plus our images (labelled ringgate.image), and nothing else.

RG_TRIPLE        ?= x86_64-unknown-linux-gnu
RG_STATIC_TARGET ?= target/static
RG_STATIC_BIN    := $(RG_STATIC_TARGET)/$(RG_TRIPLE)/release
RG_IMAGE         ?= ringgate:latest
RG_SERVER_IMAGE  ?= ringgate-server:latest
# The walkthrough's third-party server (docs/deployment.md): busybox httpd, FROM scratch.
RG_EXAMPLE_HTTPD_IMAGE ?= ringgate-example-httpd:latest
RG_BUSYBOX       ?= /bin/busybox
RG_NETWORK       ?= net1
RG_URL           ?= http://localhost:5000
# Seconds compose-up waits for the gateway to answer /rep.
RG_WAIT          ?= 60
# `make stop RG_KEEP_REPLICAS=1` leaves the replica containers running for the next start to adopt.
RG_KEEP_REPLICAS ?=
RG_COMPOSE       ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

.PHONY: static images example-httpd compose-up logs stop clean docker-stop docker-clean docker-check

# Statically linked release binaries in their own target dir (the RUSTFLAGS differ from a normal
# build, so sharing target/ would rebuild everything each time). No debug info: smaller images.
static:
	CARGO_TARGET_DIR=$(RG_STATIC_TARGET) \
	RUSTFLAGS="-C target-feature=+crt-static" \
	CARGO_PROFILE_RELEASE_DEBUG=0 \
	cargo build --release --target $(RG_TRIPLE) --bins

docker-check:
	@docker info >/dev/null 2>&1 || { echo "no Docker engine answers (docker info failed): start Docker, or use the process provider"; exit 1; }

# Both images, from the static binaries. The build context is the repository root, trimmed to the
# binaries, conf/lb.toml and policies/ by .dockerignore.
images: static docker-check
	@mkdir -p policies
	docker build -f docker/ringgate-server.Dockerfile -t $(RG_SERVER_IMAGE) .
	docker build -f docker/ringgate.Dockerfile -t $(RG_IMAGE) .
	@# Earlier builds of ours that these replaced, now untagged.
	@docker image prune -f --filter label=ringgate.image >/dev/null 2>&1 || true
	@docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E '^ringgate(-server)?:' || true

# busybox httpd from Debian's busybox-static in an empty image, for docs/deployment.md's
# third walkthrough and tests/docker_apps.rs. Its own build context (target/example-httpd/,
# just the binary), so the repository's .dockerignore does not apply. A dynamically linked
# busybox (Debian's `busybox` package) would not run FROM scratch: refused here, by name.
example-httpd: docker-check
	@bench/deps.sh busybox
	@mkdir -p target/example-httpd
	cp $(RG_BUSYBOX) target/example-httpd/busybox
	@if ldd target/example-httpd/busybox >/dev/null 2>&1; then \
	  echo "$(RG_BUSYBOX) is dynamically linked: install busybox-static (apt-get install busybox-static) or set RG_BUSYBOX"; exit 1; \
	fi
	docker build -f docker/example-httpd.Dockerfile -t $(RG_EXAMPLE_HTTPD_IMAGE) target/example-httpd
	@# Tidying: the engine runs one prune at a time, and a busy one must not fail the build.
	@docker image prune -f --filter label=ringgate.image=example-httpd >/dev/null 2>&1 || true

# The replica network is created here (labelled as ours) so that `make clean` can find it; the
# gateway itself runs in the host's network (docker-compose.yml says why).
compose-up: images
	@docker network inspect $(RG_NETWORK) >/dev/null 2>&1 || \
	  docker network create --label ringgate.managed=true --label ringgate.instance=default $(RG_NETWORK) >/dev/null
	$(RG_COMPOSE) up -d
	@echo "waiting for the gateway on $(RG_URL) ..."
	@i=0; until curl -fsS $(RG_URL)/rep >/dev/null 2>&1; do \
	  i=$$((i+1)); \
	  if [ $$i -ge $(RG_WAIT) ]; then \
	    echo "the gateway did not answer $(RG_URL)/rep within $(RG_WAIT)s; its last logs:"; \
	    $(RG_COMPOSE) logs --tail 30 ringgate; exit 1; \
	  fi; sleep 1; \
	done
	@curl -fsS $(RG_URL)/rep; echo
	@echo
	@echo "ringgate is up (replicas are Docker containers on network $(RG_NETWORK)):"
	@echo "  $(RG_URL)/lb/            the operator page: the ring, the replicas, what-if"
	@echo "  $(RG_URL)/home?id=42     a request, routed by the ring"
	@echo "  $(RG_URL)/rep            the replicas"
	@echo "  $(RG_URL)/lb/status      ring, replicas, health, policy"
	@echo "  $(RG_URL)/lb/metrics     Prometheus metrics"
	@echo "  make logs                follow the gateway's logs"
	@echo "  make stop                stop the gateway and its replicas"

logs:
	$(RG_COMPOSE) logs -f --tail 100 ringgate

# Stops the gateway (compose down), then its replica containers: a gateway that stops on SIGTERM
# leaves its containers for the next start to adopt, so they are removed here unless
# RG_KEEP_REPLICAS=1. The network and the images stay (`make clean` removes them).
docker-stop:
	@if ! docker info >/dev/null 2>&1; then echo "no Docker engine answers: no container to stop"; exit 0; fi; \
	$(RG_COMPOSE) down --remove-orphans; \
	if [ -z "$(RG_KEEP_REPLICAS)" ]; then \
	  ids=$$(docker ps -aq --filter label=ringgate.managed=true --filter label=ringgate.instance=default); \
	  if [ -n "$$ids" ]; then echo "removing replica containers: $$(docker ps -a --format '{{.Names}}' --filter label=ringgate.managed=true --filter label=ringgate.instance=default | tr '\n' ' ')"; docker rm -f $$ids >/dev/null; fi; \
	else \
	  echo "replica containers left running for the next start to adopt"; \
	fi

# Removes the stack, every container and network labelled ringgate.managed=true (including ones
# left by interrupted tests), and the two images. Nothing else is touched: a network named net1
# that ringgate did not create stays.
docker-clean:
	@if ! docker info >/dev/null 2>&1; then echo "no Docker engine answers: nothing to clean"; exit 0; fi; \
	$(RG_COMPOSE) down --remove-orphans; \
	ids=$$(docker ps -aq --filter label=ringgate.managed=true); \
	if [ -n "$$ids" ]; then echo "removing containers: $$(docker ps -a --format '{{.Names}}' --filter label=ringgate.managed=true | tr '\n' ' ')"; docker rm -f $$ids >/dev/null; fi; \
	nets=$$(docker network ls -q --filter label=ringgate.managed=true); \
	if [ -n "$$nets" ]; then echo "removing networks: $$(docker network ls --format '{{.Name}}' --filter label=ringgate.managed=true | tr '\n' ' ')"; docker network rm $$nets >/dev/null; fi; \
	for img in $(RG_IMAGE) $(RG_SERVER_IMAGE) $(RG_EXAMPLE_HTTPD_IMAGE); do \
	  if docker image inspect $$img >/dev/null 2>&1; then echo "removing image $$img"; docker image rm $$img >/dev/null; fi; \
	done; \
	old=$$(docker images -q --filter label=ringgate.image); \
	if [ -n "$$old" ]; then echo "removing older builds of our images"; docker image rm -f $$old >/dev/null; fi

stop: docker-stop
clean: docker-clean
