# ringgate — `make run` starts the gateway on :5000 with 3 replicas; `make test` runs everything.

CARGO ?= cargo
CONFIG ?= conf/lb.toml

.PHONY: run run-local build test fmt lint check

## build: release binaries (ringgate, ringgate-server)
build:
	$(CARGO) build --release --bins

## run: the gateway on port 5000 with 3 replicas: the docker-compose stack (replicas as containers)
## when a Docker engine answers, else in the foreground here with local ringgate-server processes
run:
	@if docker info >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory compose-up; \
	else \
	  echo "no Docker engine answers (docker info failed): running the gateway here with local ringgate-server processes"; \
	  $(MAKE) --no-print-directory build && ./target/release/ringgate serve --config $(CONFIG) --provider process; \
	fi

## run-local: the gateway in the foreground with local ringgate-server processes, Docker or not
run-local: build
	./target/release/ringgate serve --config $(CONFIG) --provider process

## test: the whole suite (unit, property, integration)
test:
	$(CARGO) build --bins
	$(CARGO) test --all-targets --no-fail-fast

## fmt: format the code
fmt:
	$(CARGO) fmt

## lint: formatting and clippy, warnings as errors
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## check: validate the config
check:
	$(CARGO) run --quiet --bin ringgate -- check --config $(CONFIG)

include docker/docker.mk
include bench/bench.mk
