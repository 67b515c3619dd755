#!/bin/bash
# `make bench-h2`: HTTP/2 clients (HTTP/1.1 to the replicas; and through ringgate also HTTP/2
# to them) and gRPC unary (HTTP/2 to the replicas) through ringgate, HAProxy and NGINX (2 workers or threads each) to the same two
# ringgate-server replicas, with h2load -c8 -m16 (h2c). Needs h2load (nghttp2-client), haproxy,
# nginx and a release build (`cargo build --release`); the figures in docs/performance.md
# ("HTTP/2 and gRPC to the replicas") came from it. Everything it starts is stopped on exit.
set -u
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
D=$(mktemp -d)
pids=()
# Replicas and gateways are started inside $(...) (a subshell: its pids+= is lost), so they
# note their pids in $D/pids too.
cleanup() { for p in "${pids[@]}" $(cat $D/pids 2>/dev/null); do kill "$p" 2>/dev/null; done; }
trap 'cleanup; rm -rf "$D"' EXIT
start_replica() {
  SERVER_ID=$1 PORT=0 BIND=127.0.0.1 $BIN/ringgate-server > $D/$1.out 2>&1 &
  echo $! >> $D/pids
  for i in $(seq 50); do a=$(grep -o 'http://[0-9.:]*' $D/$1.out | head -1); [ -n "$a" ] && break; sleep 0.1; done
  echo ${a#http://}
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
A=$(start_replica r1); B=$(start_replica r2)
gw() {
  cat > $D/lb-$1.toml <<T
listen = "127.0.0.1:0"
[provider]
kind = "static"
servers = [{ name = "r1", address = "$A" }, { name = "r2", address = "$B" }]
[proxy]
upstream_protocol = "$1"
[policy]
dir = "$D/policies"
T
  mkdir -p $D/policies
  $BIN/ringgate serve --config $D/lb-$1.toml > $D/gw-$1.out 2>&1 &
  echo $! >> $D/pids
  for i in $(seq 100); do a=$(grep -o 'http://[0-9.:]*' $D/gw-$1.out | head -1); [ -n "$a" ] && break; sleep 0.1; done
  echo ${a#http://}
}
G1=$(gw http1); G2=$(gw h2c)
HP1=$(free_port); HP2=$(free_port)
cat > $D/haproxy.cfg <<T
global
  nbthread 2
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
frontend h1be
  bind 127.0.0.1:$HP1 proto h2
  default_backend h1
frontend h2be
  bind 127.0.0.1:$HP2 proto h2
  default_backend h2
backend h1
  balance url_param id
  hash-type consistent
  http-reuse always
  server r1 $A
  server r2 $B
backend h2
  balance url_param id
  hash-type consistent
  http-reuse always
  server r1 $A proto h2
  server r2 $B proto h2
T
haproxy -f $D/haproxy.cfg > $D/haproxy.out 2>&1 &
pids+=($!)
NP1=$(free_port); NP2=$(free_port)
mkdir -p $D/nginx
cat > $D/nginx.conf <<T
worker_processes 2;
pid $D/nginx/nginx.pid;
error_log $D/nginx/error.log;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  http2_max_requests 10000000;
  client_body_temp_path $D/nginx;
  upstream h1 { hash \$arg_id consistent; server $A; server $B; keepalive 64; }
  upstream g { hash \$arg_id consistent; server $A; server $B; keepalive 64; }
  server { listen 127.0.0.1:$NP1 http2; location / { proxy_pass http://h1; proxy_http_version 1.1; proxy_set_header Connection ""; } }
  server { listen 127.0.0.1:$NP2 http2; location / { grpc_pass grpc://g; } }
}
T
nginx -c $D/nginx.conf > $D/nginx.out 2>&1 &
pids+=($!)
sleep 1.5
printf '\x00\x00\x00\x00\x04\x0a\x02hi' > $D/who.bin
N=${N:-100000}
run() { printf '%-58s' "$1"; shift; h2load "$@" 2>&1 | grep -E "^finished|succeeded" | tr '\n' ' ' | sed -E 's/.*finished in ([0-9.]+m?s), ([0-9.]+) req\/s.*, ([0-9]+) succeeded, ([0-9]+) failed.*/\2 req\/s (\3 ok, \4 failed)/'; echo; }
G="-d $D/who.bin -H content-type:application/grpc -H te:trailers"
for r in 1 2; do
  echo "-- run $r"
  run "h2 clients -> ringgate (http1 up)" -c8 -m16 -n$N http://$G1/home?id=1 http://$G1/home?id=2
  run "h2 clients -> ringgate (h2c up)" -c8 -m16 -n$N http://$G2/home?id=1 http://$G2/home?id=2
  run "h2 clients -> haproxy (http1 up)" -c8 -m16 -n$N http://127.0.0.1:$HP1/home?id=1 http://127.0.0.1:$HP1/home?id=2
  run "h2 clients -> nginx (http1 up)" -c8 -m16 -n$N http://127.0.0.1:$NP1/home?id=1 http://127.0.0.1:$NP1/home?id=2
  run "gRPC unary -> ringgate (h2c up)" -c8 -m16 -n$N $G http://$G2/ringgate.demo.Demo/Who?id=1 http://$G2/ringgate.demo.Demo/Who?id=2
  run "gRPC unary -> haproxy (proto h2)" -c8 -m16 -n$N $G http://127.0.0.1:$HP2/ringgate.demo.Demo/Who?id=1 http://127.0.0.1:$HP2/ringgate.demo.Demo/Who?id=2
  run "gRPC unary -> nginx (grpc_pass)" -c8 -m16 -n$N $G http://127.0.0.1:$NP2/ringgate.demo.Demo/Who?id=1 http://127.0.0.1:$NP2/ringgate.demo.Demo/Who?id=2
done
