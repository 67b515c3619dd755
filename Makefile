# ringgate — `make run` starts the gateway on :5000 with 3 replicas; `make test` runs everything.

CARGO ?= cargo
CONFIG ?= conf/lb.toml

.PHONY: run run-local urls build test fmt lint check

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
	  $(MAKE) --no-print-directory build && $(MAKE) --no-print-directory --silent urls && \
	  ./target/release/ringgate serve --config $(CONFIG) --provider process; \
	fi

## run-local: the gateway in the foreground with local ringgate-server processes, Docker or not
run-local: build
	@$(MAKE) --no-print-directory --silent urls
	./target/release/ringgate serve --config $(CONFIG) --provider process

# What to open once the gateway listens (the foreground runs print it before they start).
urls:
	@echo "ringgate on http://localhost:5000 (it prints \"listening on\" once it serves):"
	@echo "  http://localhost:5000/lb/            the operator page: the ring, the replicas, what-if"
	@echo "  http://localhost:5000/home?id=42     a request, routed by the ring"
	@echo "  http://localhost:5000/rep            the replicas"
	@echo "  http://localhost:5000/lb/status      ring, replicas, health, policy (JSON)"
	@echo "  http://localhost:5000/lb/metrics     Prometheus metrics"

## test: the whole suite of the workspace, product and lab (unit, property, integration, the
## operator page in headless Chromium, which is installed from Debian's packages when missing)
test:
	bench/deps.sh chromium curl python
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --all-targets --no-fail-fast

## fmt: format the code
fmt:
	$(CARGO) fmt --all

# Crates that belong to the lab (bench/lab) and must never reach the gateway binary or its image.
LAB_ONLY_CRATES := plotters indicatif ab_glyph image tempfile criterion

## lint: formatting and clippy over the workspace, warnings as errors (no request-path function over
## 100 lines); no import circle among the files of src/; the gateway free of the lab's crates
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	python3 .ci/import_cycles.py src
	@tree=$$($(CARGO) tree -e normal -p ringgate --prefix none --format '{p}') || exit 1; \
	found=$$(printf '%s\n' "$$tree" | awk '{print $$1}' | sort -u | \
	  grep -Fx $(addprefix -e ,$(LAB_ONLY_CRATES)) || true); \
	if [ -n "$$found" ]; then \
	  echo "lint: the ringgate package depends on lab-only crates: $$(echo $$found)"; \
	  echo "      they belong in bench/lab/Cargo.toml (or [dev-dependencies]), not in the gateway's [dependencies]"; \
	  exit 1; \
	fi

## check: validate the config
check:
	$(CARGO) run --quiet --bin ringgate -- check --config $(CONFIG)

include docker/docker.mk
include docker/swarm.mk
include bench/bench.mk
