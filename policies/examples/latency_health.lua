-- latency_health.lua: a health verdict with a latency limit.
--
-- A replica counts as healthy only when its heartbeat answers 200 within 250 ms. A slow
-- replica is reported unhealthy like a dead one, so the usual rise/fall counting takes it
-- out of the ring until it is fast again. A probe without a response (refused, timed out)
-- has no status and so is unhealthy too.
--
-- Copy it up into policies/ to activate it.

local MAX_LATENCY_MS = 250

function health(server, probe)
  return probe.status == 200 and probe.latency_ms <= MAX_LATENCY_MS
end
