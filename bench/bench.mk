# Performance analysis and benchmarks (included by the top-level Makefile).

.PHONY: analysis bench bench-micro bench-rss

## analysis: experiments A-1..A-4 and ring movement on live gateways; charts in bench/out/, report in docs/performance.md
analysis:
	bench/analysis.sh $(ANALYSIS_ARGS)

## bench: throughput of ringgate against NGINX and HAProxy (installs them and wrk when missing); table in docs/performance.md
bench:
	bench/proxies.sh $(BENCH_ARGS)

## bench-micro: criterion microbenches of the ring and the hash functions
bench-micro:
	$(CARGO) bench --bench ring

## bench-rss: gateway memory with 1,000 open client connections (DESIGN target: RSS < 30 MB)
bench-rss: build
	python3 bench/rss.py 1000
