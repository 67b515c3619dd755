# Docker Swarm targets for ringgate: several gateways sharing one ring (docs/scale-out.md).
#
# Included by the top-level Makefile. Targets:
#   swarm-up    build the images, join a swarm (initialising a single-node one when the engine
#               is in none, and saying so), deploy the stack, wait for port 5000
#   swarm-down  remove everything swarm-up and the gateways created (stack, replica services,
#               ring record, network) and leave the swarm only if swarm-up initialised it
# Variables: RG_GATEWAYS (gateway instances, default 1), RG_MESH (1: publish port 5000
# through the routing mesh, gateways on the overlay; 0: gateways in the host's network; unset:
# the mesh where the kernel has IPVS, which it needs).

RG_STACK        ?= ringgate
RG_GATEWAYS     ?= 1
RG_MESH         ?=
RG_SWARM_DIR    ?= target/swarm
RG_SWARM_MARK   := $(RG_SWARM_DIR)/initialised-by-make

.PHONY: swarm-up swarm-down

swarm-up: images
	@mkdir -p $(RG_SWARM_DIR); \
	state=$$(docker info --format '{{.Swarm.LocalNodeState}}'); \
	case "$$state" in \
	  active) ;; \
	  inactive) \
	    echo "this Docker engine is in no swarm: initialising a single-node swarm (docker swarm init --advertise-addr 127.0.0.1); make swarm-down leaves it again"; \
	    docker swarm init --advertise-addr 127.0.0.1 >/dev/null || exit 1; \
	    touch $(RG_SWARM_MARK);; \
	  *) echo "the engine's swarm state is '$$state': wait for it to settle (docker info), or leave that swarm"; exit 1;; \
	esac; \
	if [ "$$(docker info --format '{{.Swarm.ControlAvailable}}')" != true ]; then \
	  echo "this node is a Swarm worker: run make swarm-up on a manager"; exit 1; \
	fi; \
	mesh="$(RG_MESH)"; \
	if [ -z "$$mesh" ]; then \
	  if [ -e /proc/net/ip_vs ] || [ -d /sys/module/ip_vs ] || modinfo ip_vs >/dev/null 2>&1; then mesh=1; \
	  else mesh=0; echo "the kernel has no IPVS, which the routing mesh needs: the gateways run in the host's network, all on port 5000 (docker/stack.yml; RG_MESH=1 forces the mesh)"; fi; \
	fi; \
	if [ "$$mesh" = 1 ]; then \
	  stack=docker/stack-mesh.yml; \
	  docker network inspect ringgate-replicas >/dev/null 2>&1 || \
	    docker network create --driver overlay --attachable --label ringgate.managed=true --label ringgate.instance=$(RG_STACK) ringgate-replicas >/dev/null; \
	  [ -s $(RG_SWARM_DIR)/admin-token ] || head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > $(RG_SWARM_DIR)/admin-token; \
	  sed "s/@ADMIN_TOKEN@/$$(cat $(RG_SWARM_DIR)/admin-token)/" docker/swarm-mesh.toml > $(RG_SWARM_DIR)/lb-mesh.toml; \
	  echo "routing mesh: admin calls from outside loopback need: Authorization: Bearer $$(cat $(RG_SWARM_DIR)/admin-token)"; \
	else stack=docker/stack.yml; fi; \
	echo "deploying stack $(RG_STACK) from $$stack with $(RG_GATEWAYS) gateway(s)"; \
	RG_GATEWAYS=$(RG_GATEWAYS) docker stack deploy --resolve-image never -c $$stack $(RG_STACK) || exit 1; \
	echo "waiting for $(RG_GATEWAYS) gateway(s) on $(RG_URL) ..."; \
	i=0; until [ "$$(docker service ls --filter name=$(RG_STACK)_gateway --format '{{.Replicas}}')" = "$(RG_GATEWAYS)/$(RG_GATEWAYS)" ] && \
	  curl -fsS $(RG_URL)/rep >/dev/null 2>&1; do \
	  i=$$((i+1)); \
	  if [ $$i -ge $(RG_WAIT) ]; then \
	    echo "the gateways did not answer $(RG_URL)/rep within $(RG_WAIT)s:"; \
	    docker service ps --no-trunc $(RG_STACK)_gateway | head; docker service logs --tail 20 $(RG_STACK)_gateway; exit 1; \
	  fi; sleep 1; \
	done; \
	curl -fsS $(RG_URL)/rep; echo; \
	echo; \
	echo "ringgate is up on the swarm ($(RG_GATEWAYS) gateway(s); replicas are services labelled ringgate.instance=$(RG_STACK)):"; \
	echo "  curl -i '$(RG_URL)/home?id=42'   routed by the shared ring; Via names the gateway"; \
	echo "  curl $(RG_URL)/lb/status          ring fingerprint, replicas, engine"; \
	echo "  docker service ls                 the gateways, the replicas and the ring record"; \
	echo "  make swarm-down                   remove all of it"

swarm-down:
	@if ! docker info >/dev/null 2>&1; then echo "no Docker engine answers: nothing to remove"; exit 0; fi; \
	if [ "$$(docker info --format '{{.Swarm.LocalNodeState}}')" = active ]; then \
	  if docker stack ls --format '{{.Name}}' 2>/dev/null | grep -qx $(RG_STACK); then \
	    echo "removing stack $(RG_STACK)"; docker stack rm $(RG_STACK) >/dev/null; \
	  fi; \
	  i=0; while [ -n "$$(docker ps -q --filter label=com.docker.stack.namespace=$(RG_STACK))" ] && [ $$i -lt 60 ]; do i=$$((i+1)); sleep 1; done; \
	  svcs=$$(docker service ls -q --filter label=ringgate.instance=$(RG_STACK)); \
	  if [ -n "$$svcs" ]; then echo "removing services: $$(docker service ls --format '{{.Name}}' --filter label=ringgate.instance=$(RG_STACK) | tr '\n' ' ')"; docker service rm $$svcs >/dev/null; fi; \
	  i=0; while [ -n "$$(docker ps -aq --filter label=ringgate.instance=$(RG_STACK))" ] && [ $$i -lt 60 ]; do i=$$((i+1)); sleep 1; done; \
	  for n in $$(docker network ls -q --filter label=ringgate.instance=$(RG_STACK)); do \
	    j=0; until docker network rm $$n >/dev/null 2>&1 || [ $$j -ge 20 ]; do j=$$((j+1)); sleep 1; done; \
	  done; \
	fi; \
	if [ -e $(RG_SWARM_MARK) ]; then \
	  echo "leaving the single-node swarm make swarm-up initialised"; docker swarm leave --force >/dev/null; rm -f $(RG_SWARM_MARK); \
	else \
	  echo "the swarm stays: make swarm-up did not initialise it"; \
	fi
