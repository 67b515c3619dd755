# ringgate — `make run` starts the gateway on :5000 with 3 replicas; `make test` runs everything.

CARGO ?= cargo
CONFIG ?= conf/lb.toml

.PHONY: run build test fmt lint check

## build: release binaries (ringgate, ringgate-server)
build:
	$(CARGO) build --release --bins

## run: the gateway in the foreground on port 5000 with 3 local replicas
run: build
	./target/release/ringgate serve --config $(CONFIG)

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

-include docker/docker.mk
-include bench/bench.mk
