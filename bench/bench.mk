# Performance analysis and benchmarks (included by the top-level Makefile). They run the lab
# (bench/lab, binary `ringgate-lab`), which starts the release gateway binaries
# target/release/ringgate and target/release/ringgate-server.

.PHONY: analysis bench bench-micro bench-rss bench-idle bench-idle-profile bench-tunnels-profile bench-tunnels-rest bench-flood bench-log bench-streams bench-tunnels bench-h2 bench-h2-pinned bench-h2-instr bench-instr bench-conns bench-paced

## analysis: experiments A-1..A-4, ring movement and failover on live gateways (ringgate-lab analysis); charts in docs/img/ (committed), report in docs/performance.md
analysis:
	bench/analysis.sh $(ANALYSIS_ARGS)

## bench: throughput of ringgate against NGINX and HAProxy, plain and terminating TLS, then HTTP/2 clients and gRPC unary (ringgate-lab analysis proxies, then tls, then bench/h2_pinned.py; installs them, wrk and h2load when missing; each proxy pinned to CPU 0 alone and the load to the other CPUs, BENCH_PIN=0 runs the first two anywhere; TLS_BENCH=0 skips TLS, TLS_BENCH_ARGS go to it; H2_BENCH=0 skips HTTP/2, H2_BENCH_ARGS go to it); tables in docs/performance.md
bench:
	TLS_BENCH="$(TLS_BENCH)" TLS_BENCH_ARGS="$(TLS_BENCH_ARGS)" H2_BENCH="$(H2_BENCH)" H2_BENCH_ARGS="$(H2_BENCH_ARGS)" bench/proxies.sh $(BENCH_ARGS)

## bench-micro: criterion microbenches of the ring and the hash functions (the lab's benches; BENCH_MICRO_ARGS go to criterion)
bench-micro:
	$(CARGO) bench -p ringgate-lab --bench ring -- $(BENCH_MICRO_ARGS)

## bench-rss: gateway memory with 1,000 open client connections (DESIGN target: RSS < 30 MB)
bench-rss: build
	python3 bench/rss.py 1000

## bench-idle: RSS per idle keep-alive client connection (10,000 connections, one request each) through ringgate, NGINX and HAProxy, one worker each, the same three backends (PEERS=0: ringgate alone)
bench-idle: build
	bench/deps.sh proxies
	python3 bench/idle_rss.py 10000

## bench-idle-profile: where an idle keep-alive connection's bytes go: ringgate under valgrind's DHAT holding 2,200 idle connections, its heap at the peak by allocation site, per connection (needs valgrind; the profile is left in target/dhat-idle.json for dh_view)
bench-idle-profile: build
	python3 bench/idle_profile.py 2000

## bench-tunnels-profile: where an idle WebSocket tunnel's bytes go: ringgate under valgrind's DHAT holding 1,200 idle tunnels (each echoed once), its heap at the peak by allocation site, per tunnel (needs valgrind; the profile is left in target/dhat-tunnels.json)
bench-tunnels-profile: build
	python3 bench/idle_profile.py --tunnels 1000

## bench-tunnels-rest: what a tunnel's rest costs in system calls: 200 tunnels through ringgate, one message each in 5 rounds 1.5 s apart, with [tunnels] rest_after = "500ms" (each message wakes a resting tunnel) and "0s" (no rest), counted by strace -c
bench-tunnels-rest: build
	bench/deps.sh strace
	python3 bench/tunnels_rest.py 200 5

## bench-tunnels: RSS per open idle WebSocket tunnel (9,000 tunnels, two descriptors each) through ringgate, NGINX and HAProxy, one worker each, the same three backends
bench-tunnels: build
	bench/deps.sh proxies
	python3 bench/tunnels_rss.py 9000

## bench-h2: HTTP/2 clients (HTTP/1.1 to the replicas) and gRPC unary (HTTP/2 to the replicas) through ringgate, HAProxy and NGINX with h2load -c8 -m16 (h2c), the same two ringgate-server replicas
bench-h2: build
	bench/deps.sh proxies h2load
	bench/h2-peers.sh

## bench-h2-pinned: HTTP/2 clients (HTTP/1.1 to the replicas) and gRPC unary (h2c to them) through ringgate, HAProxy and NGINX, each alone on CPU 0 with one serving thread/worker, the two replicas and h2load -c8 -m16 on CPU 1: requests/s and CPU per request (/proc), medians of interleaved rounds (BENCH_H2_ARGS: requests, rounds; default 200000 3)
bench-h2-pinned: build
	bench/deps.sh proxies h2load
	python3 bench/h2_pinned.py $(BENCH_H2_ARGS)

## bench-h2-instr: user-space instructions per request on ringgate's HTTP/2 paths (HTTP/2 clients to HTTP/1.1 replicas, gRPC unary over h2c on both legs) under callgrind, one serving thread, h2load -c8 -m16 (BENCH_H2_INSTR_ARGS: requests, warm-up; default 20000 2000); dumps kept in target/callgrind-h2/
bench-h2-instr: build
	bench/deps.sh valgrind h2load
	python3 bench/h2_instr.py $(BENCH_H2_INSTR_ARGS)

## bench-streams: 220 h2c connections x 100 bodyless POST streams under nofile 20000: other clients' answers, refusals, descriptors, RSS
bench-streams: build
	pip install --quiet h2 2>/dev/null || true
	python3 bench/stream_flood.py 220 20000 10

## bench-flood: 5,000 idle connections against a 1,000-connection cap: established clients' success, replicas restarted, RSS
bench-flood: build
	python3 bench/flood.py 5000 1000 15

## bench-log: what the access log costs: wrk against the release gateway with [log] access off, then JSON, then combined, alternating (BENCH_LOG_ARGS: rounds seconds connections threads)
bench-log:
	bench/access_log_cost.sh $(BENCH_LOG_ARGS)

## bench-instr: user-space instructions per proxied request (valgrind callgrind) through ringgate, NGINX (1 worker, no master) and HAProxy (1 thread), the same three backends, random ?id=, 8 keep-alive connections: BENCH_INSTR_ARGS requests after a warm-up (default 3000 after 500), counters zeroed between; ringgate's top inclusive functions printed, its dump kept in target/callgrind-instr/
bench-instr: build
	bench/deps.sh proxies valgrind
	python3 bench/instr.py $(BENCH_INSTR_ARGS)

## bench-conns: as many idle connections as the descriptors allow (hard nofile): 19,000 idle keep-alive clients from two client processes, each answered again, then 9,000 idle WebSocket tunnels, each echoed again, through ringgate, NGINX and HAProxy (as many as its maxconn allows); RSS and its projection to 100,000
bench-conns: build
	bench/deps.sh proxies
	python3 bench/conns.py $(BENCH_CONNS_ARGS)

## bench-paced: p50/p99/p99.9 at one fixed offered rate (half the slowest proxy's maximum in the same run; h2load --h1 --rps, 64 connections) for 60 s per proxy, 3 rounds interleaved, chart docs/img/paced_latency.svg (BENCH_PACED_ARGS: seconds rounds); each proxy on CPU 0, the rest on CPU 1 (PIN=0: anywhere)
bench-paced: build
	bench/deps.sh proxies h2load
	python3 bench/paced.py $(BENCH_PACED_ARGS)
