// ringgate operator page: polls /lb/status once a second and draws it; the what-if panel posts
// to /lb/simulate. Plain JS, no framework, no external resources. Every text from the gateway
// goes into the DOM as text (textContent), never as markup.
"use strict";

const POLL_MS = 1000;
const WINDOW_MS = 10000;
const SVG = "http://www.w3.org/2000/svg";

const state = {
  history: [],       // [{t, status}] for the last WINDOW_MS, oldest first
  paused: false,
  ringKey: "",       // what the ring was last drawn from
  replicaNames: "",  // the remove select's options
  timer: null,
};

// ---- small helpers -------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

const $ = (sel) => document.querySelector(sel);

/** A stable colour per replica id (golden-angle hues), so a replica keeps its colour. */
function color(id) {
  if (id === null || id === undefined) return "var(--empty)";
  const hue = (id * 137.508 + 210) % 360;
  return `hsl(${hue.toFixed(1)} 68% 52%)`;
}

function fmtRate(x) {
  if (x === null || x === undefined || !isFinite(x)) return "–";
  if (x >= 1000) return (x / 1000).toFixed(x >= 10000 ? 0 : 1) + "k";
  if (x >= 10) return x.toFixed(0);
  return x.toFixed(1);
}

function fmtMs(ms) {
  if (ms === null || ms === undefined || !isFinite(ms)) return "–";
  if (ms < 1) return (ms * 1000).toFixed(0) + " µs";
  if (ms < 100) return ms.toFixed(ms < 10 ? 2 : 1) + " ms";
  if (ms < 10000) return ms.toFixed(0) + " ms";
  return (ms / 1000).toFixed(1) + " s";
}

function fmtPct(x, digits) {
  if (x === null || x === undefined || !isFinite(x)) return "–";
  return (100 * x).toFixed(digits === undefined ? 1 : digits) + "%";
}

function fmtDuration(ms) {
  if (ms === null || ms === undefined) return "";
  if (ms < 1000) return ms + " ms";
  const s = ms / 1000;
  return s < 120 ? s.toFixed(s < 10 ? 1 : 0) + " s" : (s / 60).toFixed(0) + " min";
}

/** The q quantile of bucket counts (bounds in µs, one overflow bucket), in ms: like
 *  ringgate's own `latency::quantile` (linear inside the bucket). */
function quantile(counts, bounds, q) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (!total) return null;
  const rank = q * total;
  let below = 0;
  for (let i = 0; i < counts.length; i++) {
    const c = counts[i];
    if (c > 0 && below + c >= rank) {
      if (i >= bounds.length) return bounds[bounds.length - 1] / 1000;
      const lower = i === 0 ? 0 : bounds[i - 1];
      const within = Math.min(1, Math.max(0, (rank - below) / c));
      return (lower + (bounds[i] - lower) * within) / 1000;
    }
    below += c;
  }
  return bounds[bounds.length - 1] / 1000;
}

// ---- rates over the window -----------------------------------------------------------------

/** The oldest sample of the window and the time between it and now (s), or null. */
function windowStart() {
  const h = state.history;
  if (h.length < 2) return null;
  const first = h[0], last = h[h.length - 1];
  const dt = (last.t - first.t) / 1000;
  return dt > 0 ? { old: first.status, dt } : null;
}

function replicaById(status, id) {
  return (status.replicas || []).find((r) => r.id === id);
}

function diffBuckets(now, old) {
  if (!old || old.length !== now.length) return now.slice();
  return now.map((c, i) => Math.max(0, c - old[i]));
}

/** Per-replica figures over the window: req/s, error share, p50/p99. */
function replicaFigures(status, r) {
  const w = windowStart();
  const bounds = status.latency_bounds_us || [];
  const errors = (x) => (x.responses ? x.responses["5xx"] : 0) + (x.failures || 0);
  if (!w) {
    return { rps: null, err: null, p50: r.latency ? r.latency.p50_ms : null, p99: r.latency ? r.latency.p99_ms : null };
  }
  const old = replicaById(w.old, r.id);
  // A replica that restarted (or joined) inside the window starts from zero.
  const base = old && old.requests <= r.requests ? old : null;
  const reqs = r.requests - (base ? base.requests : 0);
  const errs = errors(r) - (base ? errors(base) : 0);
  const attempts = reqs + (r.failures || 0) - (base ? base.failures || 0 : 0);
  const counts = diffBuckets(r.latency ? r.latency.buckets : [], base && base.latency ? base.latency.buckets : null);
  return {
    rps: reqs / w.dt,
    err: attempts > 0 ? errs / attempts : 0,
    p50: quantile(counts, bounds, 0.5),
    p99: quantile(counts, bounds, 0.99),
  };
}

function gatewayRates(status) {
  const w = windowStart();
  const g = status.gateway || {};
  if (!w || !w.old.gateway) return { rps: null, retries: null, errors: null, p50: null, p99: null };
  const o = w.old.gateway;
  const rate = (k) => Math.max(0, (g[k] || 0) - (o[k] || 0)) / w.dt;
  const counts = diffBuckets(g.latency ? g.latency.buckets : [], o.latency ? o.latency.buckets : null);
  const bounds = status.latency_bounds_us || [];
  return {
    rps: rate("requests"),
    retries: rate("retries"),
    errors: rate("local_errors"),
    p50: quantile(counts, bounds, 0.5),
    p99: quantile(counts, bounds, 0.99),
  };
}

// ---- the ring ------------------------------------------------------------------------------

const RING = { cx: 200, cy: 200, r0: 128, r1: 170, mark: 181 };

function polar(r, a) {
  return [RING.cx + r * Math.cos(a), RING.cy + r * Math.sin(a)];
}

function angle(slot, slots) {
  return -Math.PI / 2 + (2 * Math.PI * slot) / slots;
}

/** The path of one slot's cell: an annulus sector. */
function cellPath(slot, slots, geo) {
  const a0 = angle(slot, slots), a1 = angle(slot + 1, slots);
  const [x0, y0] = polar(geo.r1, a0), [x1, y1] = polar(geo.r1, a1);
  const [x2, y2] = polar(geo.r0, a1), [x3, y3] = polar(geo.r0, a0);
  const large = a1 - a0 > Math.PI ? 1 : 0;
  return `M${x0.toFixed(2)} ${y0.toFixed(2)}A${geo.r1} ${geo.r1} 0 ${large} 1 ${x1.toFixed(2)} ${y1.toFixed(2)}` +
    `L${x2.toFixed(2)} ${y2.toFixed(2)}A${geo.r0} ${geo.r0} 0 ${large} 0 ${x3.toFixed(2)} ${y3.toFixed(2)}Z`;
}

/** Draws (or redraws) a ring of `owners` into `root`; `vnodes` are [{slot, id, j}]. */
function drawRing(root, owners, vnodes, names, geo, withTips) {
  const slots = owners.length;
  root.replaceChildren();
  const cells = svg("g", { class: "cells" });
  owners.forEach((id, slot) => {
    const p = svg("path", { d: cellPath(slot, slots, geo), class: "cell", fill: color(id) });
    p.dataset.slot = slot;
    p.dataset.owner = id === null ? "" : String(id);
    cells.append(p);
  });
  root.append(cells);
  const marks = svg("g", { class: "vnodes" });
  for (const v of vnodes) {
    const a = angle(v.slot + 0.5, slots);
    const [xi, yi] = polar(geo.mark - 7, a);
    const [xl, yl] = polar(geo.mark + 2, a - 0.035), [xr, yr] = polar(geo.mark + 2, a + 0.035);
    const tri = svg("path", {
      d: `M${xi.toFixed(2)} ${yi.toFixed(2)}L${xl.toFixed(2)} ${yl.toFixed(2)}L${xr.toFixed(2)} ${yr.toFixed(2)}Z`,
      class: "vnode", fill: color(v.id),
    });
    tri.dataset.slot = v.slot;
    tri.dataset.replica = v.id;
    tri.dataset.vnode = v.j;
    marks.append(tri);
  }
  root.append(marks);
  if (withTips) attachTips(root, owners, vnodes, names);
}

function attachTips(root, owners, vnodes, names) {
  const tip = $("#tip");
  const wrap = root.parentElement;
  root.onmousemove = (ev) => {
    const t = ev.target;
    if (!t.dataset || t.dataset.slot === undefined) { tip.hidden = true; return; }
    const slot = Number(t.dataset.slot);
    let text;
    if (t.dataset.vnode !== undefined) {
      text = `${names.get(Number(t.dataset.replica)) || "?"}: virtual node ${t.dataset.vnode} at slot ${slot}`;
    } else {
      const id = owners[slot];
      text = id === null ? `slot ${slot}: no replica` : `slot ${slot} → ${names.get(id) || "replica " + id}`;
    }
    tip.textContent = text;
    const box = wrap.getBoundingClientRect();
    tip.style.left = ev.clientX - box.left + "px";
    tip.style.top = ev.clientY - box.top + "px";
    tip.hidden = false;
  };
  root.onmouseleave = () => { tip.hidden = true; };
}

function renderRing(status) {
  const ring = status.ring || {};
  const owners = ring.owners || [];
  const names = new Map((status.replicas || []).map((r) => [r.id, r.name]));
  const vnodes = [];
  for (const r of status.replicas || []) {
    (r.slots || []).forEach((slot, j) => vnodes.push({ slot, id: r.id, j }));
  }
  const key = JSON.stringify([owners, vnodes, [...names]]);
  const root = $("#ring");
  if (key !== state.ringKey) {
    drawRing(root, owners, vnodes, names, RING, true);
    const center = svg("g", {});
    const big = svg("text", { x: 200, y: 196, "text-anchor": "middle", class: "center-big" });
    big.textContent = `${status.up} / ${status.desired}`;
    const line1 = svg("text", { x: 200, y: 218, "text-anchor": "middle", class: "center" });
    line1.textContent = "replicas up";
    const line2 = svg("text", { x: 200, y: 236, "text-anchor": "middle", class: "center" });
    line2.textContent = `${ring.slots} slots · ${ring.vnodes} vnodes`;
    center.append(big, line1, line2);
    root.append(center);
    root.dataset.slots = String(owners.length);
    root.dataset.owned = String(owners.filter((o) => o !== null).length);
    state.ringKey = key;
  }
  root.dataset.generation = String(status.generation);
  $("#ring-sub").textContent = `H ${ring.request_hash} · Φ ${ring.vnode_hash} · key ${ring.key}`;
  const counts = new Map();
  for (const o of owners) if (o !== null) counts.set(o, (counts.get(o) || 0) + 1);
  const legend = $("#legend");
  legend.replaceChildren(...(status.replicas || []).map((r) => {
    const chip = el("span", { class: "chip" });
    chip.style.background = color(r.id);
    return el("li", { "data-replica": r.name }, chip, r.name, el("span", { class: "muted", text: fmtPct((counts.get(r.id) || 0) / Math.max(1, owners.length), 1) }));
  }));
}

// ---- tiles, replicas, config ---------------------------------------------------------------

function tile(label, value, unit, sub, warn) {
  const v = el("div", { class: "value" }, value);
  if (unit) v.append(el("small", { text: unit }));
  return el("div", { class: "tile" + (warn ? " warn" : "") }, el("div", { class: "label", text: label }), v, sub ? el("div", { class: "sub", text: sub }) : null);
}

function renderTiles(status) {
  const g = status.gateway || {};
  const r = gatewayRates(status);
  $("#tiles").replaceChildren(
    tile("requests / s", fmtRate(r.rps), "", `${(g.requests || 0).toLocaleString()} since start`),
    tile("replicas up", `${status.up}`, `/ ${status.desired}`, `provider ${status.provider}`, status.up < status.desired),
    tile("open connections", `${g.connections_open ?? "–"}`, "", "client connections"),
    tile("upstream p50", fmtMs(r.p50), "", `p99 ${fmtMs(r.p99)}`),
    tile("retries / s", fmtRate(r.retries), "", `${g.retries || 0} total, ${g.retries_over_budget || 0} over budget`),
    tile("gateway errors / s", fmtRate(r.errors), "", `${g.local_errors || 0} answered by the gateway`, r.errors > 0),
    tile("ejections", `${g.ejections || 0}`, "", `${g.respawns || 0} replacements started`),
  );
  const facts = $("#facts");
  facts.replaceChildren(...[
    el("span", {}, "generation ", el("b", { text: status.generation })),
    el("span", {}, "config ", el("b", { text: status.config ? status.config.generation : "–" })),
    el("span", {}, "policy ", el("b", { text: status.policy ? status.policy.generation : "–" })),
    el("span", {}, "capacity ", el("b", { text: status.ring ? status.ring.capacity : "–" })),
    el("span", { title: "FNV-1a of the owner table: gateways that route every key alike show the same" },
      "ring ", el("b", { class: "mono", text: status.ring && status.ring.fingerprint ? status.ring.fingerprint.slice(0, 8) : "–" })),
    g.name ? el("span", {}, "gateway ", el("b", { text: g.name })) : null,
    engineFact(status.engine),
    tlsFact(status.tls),
  ].filter(Boolean));
  $("#version").textContent = status.version ? "v" + status.version : "";
}

/** The swarm engine that holds the shared ring record (absent for other providers). */
function engineFact(engine) {
  if (!engine) return null;
  const text = engine.reachable ? `reachable, record v${engine.record_version ?? "–"}` : "unreachable: routing on the last ring seen";
  return el("span", { title: engine.detail || engine.record_error || null }, "engine ",
    el("b", { class: engine.reachable && !engine.record_error ? "" : "bad", text }));
}

/** The certificate that lapses first, in days; a rejected certificate edit (null while TLS is off). */
function tlsFact(tls) {
  if (!tls) return null;
  const certs = tls.certificates || [];
  const soonest = certs.reduce((a, c) => (a === null || c.expires_in_seconds < a.expires_in_seconds ? c : a), null);
  const days = soonest ? Math.floor(soonest.expires_in_seconds / 86400) : null;
  const text = days === null ? "no certificate" : `${certs.length} cert${certs.length === 1 ? "" : "s"}, first expiry in ${days} d`;
  const bad = tls.last_error || days === null || days < 14;
  return el("span", { title: tls.last_error || (soonest ? `${soonest.subject || ""} until ${soonest.not_after_utc}` : null) }, "tls ",
    el("b", { class: bad ? "bad" : "", text: tls.last_error ? text + " (edit rejected)" : text }));
}

function backoff(r) {
  if (r.next_restart_in_ms !== null && r.next_restart_in_ms !== undefined) {
    return `restart in ${fmtDuration(r.next_restart_in_ms)}` + (r.crash_streak ? ` (streak ${r.crash_streak})` : "");
  }
  if (r.crash_streak) return `streak ${r.crash_streak}`;
  return "";
}

function renderReplicas(status) {
  const owners = (status.ring && status.ring.owners) || [];
  const counts = new Map();
  for (const o of owners) if (o !== null) counts.set(o, (counts.get(o) || 0) + 1);
  const rows = (status.replicas || []).map((r) => {
    const f = replicaFigures(status, r);
    const chip = el("span", { class: "chip" });
    chip.style.background = color(r.id);
    const share = (counts.get(r.id) || 0) / Math.max(1, owners.length);
    const bar = el("span", { class: "sharebar" }, el("i"));
    bar.firstChild.style.width = (100 * share).toFixed(1) + "%";
    bar.firstChild.style.background = color(r.id);
    const stateClass = String(r.state).replace(/[^a-z_-]/gi, "");
    const why = r.last_exit || (r.last_probe && r.last_probe.error) || "";
    return el("tr", { "data-replica": r.name, "data-state": r.state, "data-id": r.id },
      el("td", { class: "name" }, chip, r.name, el("span", { class: "sub", text: `#${r.id}` })),
      el("td", { title: why || null }, el("span", { class: "badge " + stateClass, text: r.state }), r.in_ring ? null : el("span", { class: "sub", text: "off ring" })),
      el("td", { class: "mono", text: r.address || "–" }),
      el("td", { class: "num", text: fmtRate(f.rps) }),
      el("td", { class: "num" + (f.err > 0 ? " bad" : ""), text: f.err === null ? "–" : fmtPct(f.err, f.err > 0 && f.err < 0.01 ? 2 : 1) }),
      el("td", { class: "num", text: fmtMs(f.p50) }),
      el("td", { class: "num", text: fmtMs(f.p99) }),
      el("td", { class: "num", text: r.in_flight }),
      el("td", { class: "num", "data-tunnels": r.tunnels || 0, text: r.tunnels || 0 }),
      el("td", { class: "num" }, fmtPct(share, 1), bar),
      el("td", { title: why || null }, String(r.restarts), backoff(r) ? el("span", { class: "sub", text: backoff(r) }) : null),
    );
  });
  $("#replicas tbody").replaceChildren(...rows);
  $("#replicas-sub").textContent = `${(status.replicas || []).length} kept · ${status.up} in the ring`;
  const names = (status.replicas || []).filter((r) => r.state !== "draining").map((r) => r.name);
  if (names.join("\n") !== state.replicaNames) {
    const select = document.querySelector("select[name=replica]");
    const keep = select.value;
    select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
    if (names.includes(keep)) select.value = keep;
    state.replicaNames = names.join("\n");
  }
}

function errorBox(title, text) {
  return el("div", { class: "error" }, el("b", { text: title + ": " }), text);
}

function renderConfig(status) {
  const c = status.config || {}, p = status.policy || {}, ring = status.ring || {}, h = status.health || {};
  const dl = $("#config");
  const row = (k, v) => [el("dt", { text: k }), el("dd", {}, v)];
  dl.replaceChildren(
    ...row("config generation", `${c.generation ?? "–"}` + (c.generation ? " (edits applied since start)" : " (as started)")),
    ...row("ring", `${ring.slots} slots, ${ring.vnodes} vnodes, request_hash ${ring.request_hash}, vnode_hash ${ring.vnode_hash}`),
    ...row("key", ring.key || "–"),
    ...row("health", `every ${fmtDuration(h.interval_ms)}, timeout ${fmtDuration(h.timeout_ms)}, rise ${h.rise}, fall ${h.fall}`),
    ...row("policy generation", `${p.generation ?? "–"}`),
    ...row("policy files", (p.files && p.files.length) ? el("span", { class: "mono", text: p.files.join(", ") }) : "none (built-in hashes)"),
  );
  const hooks = p.hooks || {};
  $("#hooks tbody").replaceChildren(...Object.entries(hooks).map(([name, x]) =>
    el("tr", { "data-hook": name },
      el("td", { class: "mono", text: name }),
      el("td", { text: x.defined ? "yes" : "–" }),
      el("td", { class: "num", text: (x.calls || 0).toLocaleString() }),
      el("td", { class: "num" + (x.errors ? " bad" : ""), text: (x.errors || 0).toLocaleString() }))));
  const errs = [];
  if (c.last_error) errs.push(errorBox("config edit rejected", c.last_error));
  if (c.restart_needed && c.restart_needed.length) errs.push(errorBox("needs a restart", c.restart_needed.join(", ")));
  if (p.last_load_error) errs.push(errorBox("policy rejected", p.last_load_error));
  if (p.last_hook_error) {
    const e = p.last_hook_error;
    errs.push(errorBox(`last ${e.hook} error (${new Date(e.at).toLocaleTimeString()})`, e.message));
  }
  $("#policy-errors").replaceChildren(...errs);
}

// ---- polling -------------------------------------------------------------------------------

function setLive(ok, text) {
  $("#live-dot").className = "live-dot " + (ok ? "ok" : "bad");
  $("#live-text").textContent = text;
}

async function poll() {
  state.timer = null;
  if (state.paused) return;
  try {
    const resp = await fetch("status", { cache: "no-store", headers: { Accept: "application/json" } });
    const body = await resp.json().catch(() => null);
    if (!resp.ok || !body || body.status !== "successful") {
      throw new Error(body && body.message ? body.message : `HTTP ${resp.status}`);
    }
    const status = body.message;
    const now = Date.now();
    state.history.push({ t: now, status });
    while (state.history.length > 2 && now - state.history[0].t > WINDOW_MS) state.history.shift();
    const t0 = performance.now();
    render(status);
    const drawn = performance.now() - t0;
    document.body.dataset.renderMs = drawn.toFixed(2);
    setLive(true, `live · ${new Date(now).toLocaleTimeString()} · drawn in ${drawn.toFixed(1)} ms`);
  } catch (e) {
    setLive(false, "no answer: " + e.message);
  }
  if (!state.paused) state.timer = setTimeout(poll, POLL_MS);
}

/** N and in flight over the last minutes (the autoscaler's own samples), while it is on. */
function renderAutoscale(status) {
  const a = status.autoscale;
  const card = $("#autoscale");
  card.hidden = !(a && a.enabled);
  if (card.hidden) return;
  const points = a.history || [];
  const chart = $("#autoscale-chart");
  const W = 600, H = 140;
  const span = Math.max(60, ...points.map((p) => p.ago_s));
  // One scale for both lines: N, and in flight divided by the target per replica, so the
  // dashed line sits on N's when the replicas carry exactly the target.
  const top = Math.max(a.max, ...points.map((p) => p.in_flight / a.target_in_flight)) * 1.1;
  const x = (ago) => W - (ago / span) * W;
  const y = (v) => H - (v / top) * H;
  const line = (cls, value) => svg("polyline", {
    class: cls,
    points: points.map((p) => `${x(p.ago_s).toFixed(1)},${y(value(p)).toFixed(1)}`).join(" "),
  });
  const bounds = [a.min, a.max].map((b) => svg("line", { class: "bound", x1: 0, x2: W, y1: y(b), y2: y(b) }));
  chart.replaceChildren(...bounds, line("f", (p) => p.in_flight / a.target_in_flight), line("n", (p) => p.n));
  // Scale to zero: the idle window, whether it sleeps now, and the requests it held.
  const zero = a.idle_to_zero_ms > 0 && a.min === 0
    ? ` · to zero after ${fmtDuration(a.idle_to_zero_ms)} idle${a.scaled_to_zero ? " (asleep now)" : ""}, held ${a.held_total} (${a.held_now} now, ${a.hold_refused_full + a.hold_refused_timeout} refused)`
    : "";
  $("#autoscale-sub").textContent = `N ${a.min}–${a.max}, target ${a.target_in_flight} in flight per replica, asks for ${a.desired} · last ${Math.round(span / 60)} min${zero}`;
  const d = a.last_decision;
  $("#autoscale-decision").textContent = d
    ? `last move ${d.direction} ${d.from} → ${d.to} (in flight ${d.stable_in_flight.toFixed(1)} over ${fmtDuration(a.stable_window_ms)}, ${d.panic_in_flight.toFixed(1)} over ${fmtDuration(a.panic_window_ms)}${d.panicking ? ", panicking" : ""})`
    : "no move yet";
}

function render(status) {
  renderTiles(status);
  renderAutoscale(status);
  renderRing(status);
  renderReplicas(status);
  renderConfig(status);
  document.body.dataset.generation = String(status.generation);
}

// ---- what-if -------------------------------------------------------------------------------

function whatIfRequest(form) {
  const data = new FormData(form);
  const action = data.get("action");
  const body = { action };
  if (action === "add" && data.get("hostname")) body.hostname = String(data.get("hostname")).trim();
  if (action === "remove") body.replica = data.get("replica");
  if (action === "hash") {
    if (data.get("request_hash")) body.request_hash = data.get("request_hash");
    if (data.get("vnode_hash")) body.vnode_hash = data.get("vnode_hash");
  }
  if (action === "policy") body.lua = data.get("lua");
  return body;
}

function miniRing(owners, label) {
  const root = svg("svg", { viewBox: "0 0 400 400" });
  drawRing(root, owners, [], new Map(), { r0: 120, r1: 185, mark: 0 }, false);
  const t = svg("text", { x: 200, y: 208, "text-anchor": "middle", class: "mini-label" });
  t.textContent = label;
  root.append(t);
  return root;
}

function renderAnswer(a) {
  const moved = el("b", { text: fmtPct(a.moved, 1) });
  const rows = a.servers.map((s) => {
    const chip = el("span", { class: "chip" });
    chip.style.background = color(s.id);
    const delta = s.after - s.before;
    const cls = Math.abs(delta) < 0.0005 ? "muted" : delta > 0 ? "delta-up" : "delta-down";
    return el("tr", { "data-replica": s.name, "data-change": s.change },
      el("td", { class: "name" }, chip, s.name, s.change === "kept" ? null : el("span", { class: "sub", text: s.change })),
      el("td", { class: "num", text: fmtPct(s.before, 1) }),
      el("td", { class: "num", text: fmtPct(s.after, 1) }),
      el("td", { class: "num " + cls, text: (delta >= 0 ? "+" : "") + (100 * delta).toFixed(1) }),
      el("td", { class: "num muted", text: `${s.slots_before} → ${s.slots_after}` }));
  });
  const table = el("table", { class: "compact" },
    el("thead", {}, el("tr", {}, el("th", { text: "server" }), el("th", { class: "num", text: "keys now" }), el("th", { class: "num", text: "after" }), el("th", { class: "num", text: "Δ pts" }), el("th", { class: "num", text: "slots" }))),
    el("tbody", {}, ...rows));
  const notes = [];
  if (a.unrouted_after > 0) notes.push(errorBox("unrouted", `${fmtPct(a.unrouted_after)} of the keys would find no replica`));
  const tunnels = a.tunnels_open > 0
    ? el("p", { class: "tunnels", "data-tunnels-closed": a.tunnels_closed, text: `${a.tunnels_closed.toLocaleString()} of ${a.tunnels_open.toLocaleString()} open tunnels would be closed and re-homed` })
    : null;
  const flows = a.moves.slice(0, 4).map((m) => `${m.from || "nobody"} → ${m.to || "nobody"} ${fmtPct(m.share, 1)}`).join(" · ");
  return el("div", { class: "result", "data-moved": a.moved.toFixed(6), "data-change": a.change },
    el("div", { class: "headline" }, moved, " of the keys would move ", el("span", { class: "muted", text: `(${a.change}; ${a.keys.toLocaleString()} keys, ${a.took_ms.toFixed(0)} ms)` })),
    el("div", { class: "rings" }, miniRing(a.owners_before, "now"), el("span", { class: "arrow", text: "→" }), miniRing(a.owners_after, "after")),
    table,
    flows ? el("p", { class: "muted small", text: "largest moves: " + flows }) : null,
    tunnels,
    ...notes);
}

async function simulate(ev) {
  ev.preventDefault();
  const form = ev.target;
  const button = $("#simulate");
  const out = $("#whatif-result");
  button.disabled = true;
  try {
    const resp = await fetch("simulate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(whatIfRequest(form)),
    });
    const body = await resp.json().catch(() => null);
    if (!resp.ok || !body || body.status !== "successful") {
      const msg = body && body.message ? String(body.message).replace(/^<Error> /, "") : `HTTP ${resp.status}`;
      out.replaceChildren(el("div", { class: "result", "data-error": resp.status }, errorBox("cannot simulate", msg)));
      return;
    }
    out.replaceChildren(renderAnswer(body.message));
  } catch (e) {
    out.replaceChildren(errorBox("cannot simulate", e.message));
  } finally {
    button.disabled = false;
  }
}

function showFields() {
  const action = new FormData($("#whatif")).get("action");
  for (const f of document.querySelectorAll(".fields")) f.hidden = f.dataset.for !== action;
}

function init() {
  $("#whatif").addEventListener("submit", simulate);
  $("#whatif").addEventListener("change", showFields);
  $("#pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("#pause").textContent = state.paused ? "Resume" : "Pause";
    if (state.paused) {
      if (state.timer) clearTimeout(state.timer);
      setLive(false, "paused");
    } else {
      poll();
    }
  });
  showFields();
  poll();
}

document.addEventListener("DOMContentLoaded", init);
