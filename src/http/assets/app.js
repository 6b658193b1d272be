// The fleetcare dashboard: plain JavaScript, no framework, no build step.
// Every URL is relative (api/v1/...), so the page works behind a reverse
// proxy that strips a path prefix. Data goes into the DOM as text only.
"use strict";

const STATUSES = ["IDLE", "BUSY", "ON_CALL", "EXHAUSTED", "OFFLINE"];
const TOKEN_KEY = "fleetcare-token";
const FEED_MAX = 500;
// What a registration comes from (the API's `from` of a REGISTERED transition).
const NEW = "NEW";
// Agents a page of the fleet table holds (the API's default page size).
const PAGE_SIZE = 200;
// Claims a page of the claims table holds.
const CLAIMS_PAGE = 200;
// The causes of an agent's last transition: it is gone (DeleteAgent, or the
// sweeper after --offline-agent-retention).
const GONE = new Set(["DELETED", "EXPIRED"]);
// How the feed words a cause, where its name alone says too little.
const CAUSE_TEXT = { EXPIRED: "expired (offline too long)", CLAIM_EXPIRED: "claim lease expired" };

// A claim lasts as long as the work it took: BUSY or ON_CALL.
function working(status) {
  return status === "BUSY" || status === "ON_CALL";
}

// Whether a transition adds, ends or drops a claim.
function touchesClaims(t) {
  return t.cause === "CLAIMED" || GONE.has(t.cause) || (working(t.from) && !working(t.to));
}

// ---- DOM helpers -----------------------------------------------------------

// h("td", {class: "num"}, "12", child): an element; strings become text nodes.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, ...children);
  return el;
}

function append(el, ...children) {
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return append(el, ...children);
}

function table(head, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty || "nothing here");
  return h("table", {},
    h("thead", {}, h("tr", {}, head.map((c) => h("th", { class: c.endsWith("#") ? "num" : null }, c.replace(/#$/, ""))))),
    h("tbody", {}, rows));
}

function card(n, label, attrs) {
  return h("div", Object.assign({ class: "card" }, attrs), h("div", { class: "n" }, n), h("div", { class: "l" }, label));
}

// ---- time ------------------------------------------------------------------

function span(ms) {
  let sec = Math.max(0, Math.round(ms / 1000));
  if (sec < 60) return sec + " s";
  const min = Math.floor(sec / 60);
  if (min < 60) return min + " min " + (sec % 60) + " s";
  const hr = Math.floor(min / 60);
  if (hr < 48) return hr + " h " + (min % 60) + " min";
  return Math.floor(hr / 24) + " d " + (hr % 24) + " h";
}

function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

// A time as the local wall clock, 14:05:31 (with its date when not today).
function clock(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  const p = (n) => String(n).padStart(2, "0");
  const time = p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  if (d.toDateString() === new Date().toDateString()) return time;
  return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " + time;
}

// Elements whose text follows the clock: data-since (time since), data-ago
// ("12 s ago"), data-until ("in 4 h 2 min"); refreshed every second.
function ticking(kind, iso) {
  const el = h("span", { ["data-" + kind]: iso || "" });
  tick(el);
  return el;
}

function tick(el) {
  const now = Date.now();
  if (el.dataset.since !== undefined) el.textContent = el.dataset.since ? span(now - Date.parse(el.dataset.since)) : "";
  else if (el.dataset.ago !== undefined) el.textContent = el.dataset.ago ? span(now - Date.parse(el.dataset.ago)) + " ago" : "never";
  else if (el.dataset.until !== undefined) {
    const left = Date.parse(el.dataset.until) - now;
    el.textContent = !el.dataset.until ? "" : left > 0 ? "in " + span(left) : "due " + span(-left) + " ago";
  }
}

setInterval(() => document.querySelectorAll("[data-since],[data-ago],[data-until]").forEach(tick), 1000);

// ---- the API ---------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || "HTTP " + status);
    this.status = status;
    this.code = body && body.code;
    this.reason = body && body.reason;
  }
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  return headers;
}

async function api(path, options) {
  const opts = Object.assign({}, options);
  opts.headers = authHeaders(opts.headers);
  const response = await fetch("api/v1/" + path, opts);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new ApiError(response.status, body);
    if (response.status === 401) askForToken(error.message);
    throw error;
  }
  return body;
}

// POST with the headers the server requires of state-changing calls.
function post(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Fleetcare-Request": "1" },
    body: JSON.stringify(body),
  });
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    for (const x of [].concat(v)) if (x !== undefined && x !== null && x !== "") q.append(k, x);
  }
  const text = q.toString();
  return text ? "?" + text : "";
}

const tokenForm = document.getElementById("token-form");
const tokenInput = document.getElementById("token-input");

function askForToken(why) {
  tokenForm.hidden = false;
  document.getElementById("token-error").textContent = sessionStorage.getItem(TOKEN_KEY) ? why : "";
  tokenInput.focus();
}

tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim());
  tokenInput.value = "";
  tokenForm.hidden = true;
  watch.restart();
  render();
});

function notice(text) {
  const el = document.getElementById("notice");
  el.textContent = text || "";
  el.hidden = !text;
}

// ---- the live state: counts, a page of agents, and one resuming stream -----
//
// A fleet may hold 100,000 agents, so the page never loads them all: the
// counts come from an aggregate read at a revision R (fleet/counts), the
// table from pages of ListAgents (filtered by the server), and the stream of
// transitions after R keeps both current: the counts move by each
// transition's from/to status, a loaded row takes its agent's new status.

const feed = []; // newest first
const fleet = new Map(); // agent_id -> agent view: the rows loaded, in the server's order
// The table's query and how far it has been read.
const fleetView = {
  status: "", // "" or one status
  labels: "", // "key=value key2=value2"
  next: "", // the next page's token
  complete: false, // every agent matching the query is loaded
  last: null, // the last agent id loaded
  loading: false,
  loaded: false, // the first page arrived
  error: null,
  generation: 0, // a new query makes answers to the older one stale
};
let counts = null; // { revision, total, counts: { IDLE: n, ... } }
// Agents whose Cordon button was clicked: agent_id -> the reason typed so far.
const cordoning = new Map();

const connState = document.getElementById("conn-state");
function setConnection(state, text) {
  connState.dataset.state = state;
  connState.textContent = text;
  document.body.dataset.conn = state;
  const resume = watch && watch.revision !== null ? "resumes after #" + watch.revision : "reloads the fleet";
  for (const el of document.querySelectorAll(".reconnect-banner")) {
    el.textContent = "Reconnecting to the server… the stream " + resume + " once it is back, losing nothing.";
  }
}

// The counts as of a revision. An answer older than what the stream has
// already applied is dropped; a newer one replaces the counts (the stream
// then adds only transitions after its revision).
async function loadCounts() {
  const fresh = await api("fleet/counts");
  if (!counts || fresh.revision >= counts.revision) {
    counts = fresh;
    changed("counts");
  }
  return fresh;
}

function labelsOf(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

function fleetQuery(extra) {
  return query(Object.assign({ status: fleetView.status, label: labelsOf(fleetView.labels), page_size: PAGE_SIZE }, extra));
}

// The first page of the current query (the filter changed, or a new start).
async function reloadFleet() {
  const generation = ++fleetView.generation;
  fleetView.loading = true;
  changed("busy");
  try {
    const page = await api("agents" + fleetQuery());
    if (generation !== fleetView.generation) return;
    fleet.clear();
    takePage(page);
    fleetView.error = null;
  } catch (error) {
    if (generation !== fleetView.generation) return;
    fleet.clear();
    fleetView.error = error;
  }
  fleetView.loading = false;
  fleetView.loaded = true;
  changed("page");
}

// The next page, after the rows loaded.
async function loadMore() {
  if (fleetView.loading || fleetView.complete) return;
  const generation = fleetView.generation;
  fleetView.loading = true;
  changed("busy");
  try {
    const page = await api("agents" + fleetQuery({ page_token: fleetView.next }));
    if (generation !== fleetView.generation) return;
    takePage(page);
  } catch (error) {
    if (generation !== fleetView.generation) return;
    notice("could not load more agents: " + error.message);
  }
  fleetView.loading = false;
  changed("page");
}

function takePage(page) {
  for (const a of page.agents) fleet.set(a.agent_id, a);
  if (page.agents.length) fleetView.last = page.agents[page.agents.length - 1].agent_id;
  fleetView.next = page.next_page_token;
  fleetView.complete = !page.next_page_token;
}

// Whether an agent the table has not loaded belongs among its rows: it
// matches the query and sorts within what was loaded (beyond that, it comes
// with its page).
function belongs(agent) {
  if (!fleetView.loaded || fleetView.error) return false;
  if (fleetView.status && agent.status !== fleetView.status) return false;
  for (const want of labelsOf(fleetView.labels)) {
    const [k, v] = want.split("=");
    if (agent.labels[k] !== v) return false;
  }
  return fleetView.complete || (fleetView.last !== null && agent.agent_id < fleetView.last);
}

// WatchTransitions over SSE, resumed like the clients' resuming watch: after
// the last revision seen (Last-Event-ID). Starting afresh (or after a pruned
// revision, OUT_OF_RANGE), the counts are read first and the stream starts
// at their revision. fetch + a stream parser, since EventSource cannot send
// the Authorization header.
class Watch {
  constructor() {
    this.revision = null; // null: (re)load the counts and the fleet
    this.controller = null;
    this.delay = 250;
    this.reconnects = 0;
  }

  restart() {
    if (this.controller) this.controller.abort();
    this.revision = null;
    this.start();
  }

  async start() {
    const controller = new AbortController();
    this.controller = controller;
    let retry = true;
    try {
      if (this.revision === null) {
        counts = null;
        const fresh = await loadCounts();
        if (controller.signal.aborted) return;
        this.revision = fresh.revision;
        reloadFleet();
        if (!feed.length) loadHistory(fresh.revision);
      }
      const headers = authHeaders({ Accept: "text/event-stream", "Last-Event-ID": String(this.revision) });
      const response = await fetch("api/v1/transitions/stream", { headers, signal: controller.signal, cache: "no-store" });
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        throw new ApiError(response.status, body);
      }
      setConnection("live", "live");
      this.delay = 250;
      await this.read(response.body, controller);
    } catch (error) {
      if (controller.signal.aborted) retry = false;
      else if (error instanceof ApiError && error.status === 401) {
        askForToken(error.message);
        setConnection("unauthenticated", "token needed");
        retry = false;
      } else if (error instanceof ApiError && error.code === "OUT_OF_RANGE") this.revision = null;
      else if (!(error instanceof ApiError) || error.status >= 500) console.warn("watch:", error.message);
      else notice("transition stream: " + error.message);
    } finally {
      if (retry && this.controller === controller) this.reconnect();
    }
  }

  reconnect() {
    this.reconnects += 1;
    setConnection("reconnecting", "reconnecting…");
    const delay = this.delay;
    this.delay = Math.min(this.delay * 2, 5000);
    setTimeout(() => this.start(), delay);
  }

  // Server-sent events: blank-line separated blocks of "field: value" lines.
  async read(body, controller) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done || controller.signal.aborted) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = { type: "message", data: [], id: null };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event.type = val;
          else if (field === "data") event.data.push(val);
          else if (field === "id") event.id = val;
        }
        if (event.data.length) this.handle(event.type, JSON.parse(event.data.join("\n")), event.id);
      }
    }
  }

  handle(type, data, id) {
    if (type === "transition") {
      this.revision = Number(id);
      applyTransition(data);
    } else if (type === "progress") {
      this.revision = Math.max(this.revision || 0, Number(id));
    } else if (type === "error") {
      // The stream ends after an error; a pruned revision means a fresh start.
      if (data.code === "OUT_OF_RANGE") this.revision = null;
      else notice("transition stream: " + data.message);
    }
  }
}

function applyTransition(t) {
  feed.unshift(t);
  if (feed.length > FEED_MAX) feed.length = FEED_MAX;
  const gone = GONE.has(t.cause);
  // The counts move by the transition, unless they already include it; a
  // deleted agent leaves them.
  if (counts && t.revision > counts.revision) {
    if (t.from === NEW) counts.total += 1;
    else counts.counts[t.from] = (counts.counts[t.from] || 0) - 1;
    if (gone) counts.total -= 1;
    else counts.counts[t.to] = (counts.counts[t.to] || 0) + 1;
    counts.revision = t.revision;
  }
  const agent = fleet.get(t.agent_id);
  if (agent && gone) fleet.delete(t.agent_id);
  else if (agent && agent.revision < t.revision) {
    agent.status = t.to;
    agent.revision = t.revision;
    // A cordon leaves the status, and the time it was entered, as they were.
    if (t.from !== t.to) agent.last_transition_at = t.occurred_at;
    if (t.to !== "EXHAUSTED") {
      delete agent.recovery_at;
      delete agent.recovery_hint;
    } else if (t.recovery_at) agent.recovery_at = t.recovery_at;
    if (t.cause === "CORDONED") {
      agent.schedulable = false;
      agent.cordon_reason = agent.cordon_reason || "";
    } else if (t.cause === "UNCORDONED") {
      agent.schedulable = true;
      delete agent.cordon_reason;
    }
    if (working(t.from) && !working(t.to)) delete agent.claim;
    // The holder is the actor and the token the revision; the lease comes
    // with the agent, read below.
    if (t.cause === "CLAIMED") agent.claim = { agent_id: t.agent_id, holder: t.actor, fencing_token: t.revision };
  }
  // A loaded agent's hint, cordon reason and lease are not in the
  // transition; a new agent is fetched if it belongs among the rows loaded
  // (one not loaded is not forced in).
  const details = t.to === "EXHAUSTED" || t.cause === "CORDONED" || t.cause === "CLAIMED";
  if (agent ? !gone && details : t.from === NEW) refreshAgent(t.agent_id);
  changed("transition", t);
}

// The feed starts with the last transitions before the stream's start.
async function loadHistory(revision) {
  try {
    const page = await api("transitions" + query({ after: Math.max(0, revision - 100), page_size: 100 }));
    const known = new Set(feed.map((t) => t.revision));
    const older = page.transitions.filter((t) => t.revision <= revision && !known.has(t.revision)).reverse();
    feed.push(...older);
    feed.sort((a, b) => b.revision - a.revision);
    changed("history");
  } catch (_) {
    /* the live part still works */
  }
}

async function refreshAgent(id) {
  try {
    const agent = await api("agents/" + encodeURIComponent(id));
    if (!fleet.has(id) && !belongs(agent)) return;
    mergeAgent(agent);
    changed("agent", agent);
  } catch (error) {
    if (error.status === 404 && fleet.delete(id)) changed("page");
  }
}

// A fetched agent replaces ours only if it is at least as recent; a new one
// takes its place in agent id order.
function mergeAgent(agent) {
  const known = fleet.get(agent.agent_id);
  if (known) {
    if (agent.revision >= known.revision) fleet.set(agent.agent_id, agent);
    else known.last_heartbeat_at = agent.last_heartbeat_at;
    return;
  }
  const rows = [...fleet.values(), agent].sort((a, b) => (a.agent_id < b.agent_id ? -1 : a.agent_id > b.agent_id ? 1 : 0));
  fleet.clear();
  for (const a of rows) fleet.set(a.agent_id, a);
}

// Heartbeats are not transitions: while the fleet page is shown, the loaded
// rows are re-read every 15 s (their pages again, at most 1000 a call), and
// the counts with them.
setInterval(async () => {
  if (route() !== "fleet" || !fleetView.loaded || fleetView.loading || document.hidden) return;
  const generation = fleetView.generation;
  try {
    await loadCounts();
    let token = "";
    for (let read = 0; read < fleet.size; ) {
      const page = await api("agents" + fleetQuery({ page_size: Math.min(1000, fleet.size - read), page_token: token }));
      if (generation !== fleetView.generation) return;
      for (const a of page.agents) if (fleet.has(a.agent_id)) mergeAgent(a);
      read += page.agents.length;
      token = page.next_page_token;
      if (!token || !page.agents.length) break;
    }
    changed("heartbeats");
  } catch (_) {
    /* shown by the stream's state */
  }
}, 15000);

var watch = new Watch();

// ---- pages -----------------------------------------------------------------

const page = document.getElementById("page");
const pages = { fleet: fleetPage, claims: claimsPage, pools: poolsPage, feed: feedPage, healing: healingPage, usage: usagePage, pipeline: pipelinePage };
let current = null; // { name, update? }

function route() {
  const name = (location.hash.match(/^#\/(\w+)/) || [])[1];
  return pages[name] ? name : "fleet";
}

function render() {
  const name = route();
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.route === name);
  notice("");
  page.replaceChildren();
  current = { name };
  const update = pages[name](page);
  if (typeof update === "function") current.update = update;
}

function changed(what, detail) {
  if (current && current.update) current.update(what, detail);
}

function failed(container, error) {
  container.replaceChildren(h("p", { class: "error" }, error.status === 401 ? "a token is needed" : "could not load: " + error.message));
}

// The fleet: counts by status, a filter the server applies, and the agents
// a page at a time, live.
function fleetPage(root) {
  const cards = h("div", { class: "cards", id: "counts" });
  const statusSelect = h("select", { id: "filter-status", onchange: () => requery(0) },
    h("option", { value: "" }, "every status"), STATUSES.map((st) => h("option", { value: st }, st)));
  statusSelect.value = fleetView.status;
  const labelInput = h("input", { id: "filter-label", placeholder: "label key=value", value: fleetView.labels, oninput: () => requery(300) });
  const shown = h("span", { class: "muted", id: "shown" });
  const body = h("div", { id: "fleet-table" });
  const more = h("button", { id: "load-more", onclick: () => loadMore() });
  const shownBelow = h("span", { class: "muted" });
  const footer = h("div", { class: "more" }, shownBelow, more);
  append(root, h("div", { class: "reconnect-banner" }), cards,
    h("div", { class: "filters" }, statusSelect, labelInput, shown), body, footer);
  setConnection(connState.dataset.state, connState.textContent);

  // A new query: the table is marked busy at once, the server asked after a
  // pause in typing.
  let timer = null;
  function requery(delay) {
    fleetView.status = statusSelect.value;
    fleetView.labels = labelInput.value.trim();
    body.setAttribute("aria-busy", "true");
    clearTimeout(timer);
    timer = setTimeout(() => {
      timer = null;
      reloadFleet();
    }, delay);
  }

  function drawCounts() {
    const n = (x) => (x === undefined || x === null ? "–" : x.toLocaleString("en-US"));
    cards.replaceChildren(card(n(counts && counts.total), "agents", { "data-count": "ALL" }),
      ...STATUSES.map((st) => card(n(counts && counts.counts[st]), st.replace("_", " "), { class: "card s-" + st, "data-count": st })));
    // How many agents the query selects: known from the counts unless labels filter.
    let total = null;
    if (counts && !labelsOf(fleetView.labels).length) total = fleetView.status ? counts.counts[fleetView.status] : counts.total;
    if (fleetView.complete) total = fleet.size;
    shown.textContent = !fleetView.loaded ? "" :
      fleet.size.toLocaleString("en-US") + (total !== null ? " of " + total.toLocaleString("en-US") : "") + " shown";
    more.hidden = !fleetView.loaded || fleetView.complete || !!fleetView.error;
    shownBelow.textContent = more.hidden ? "" : shown.textContent;
    more.disabled = fleetView.loading;
    more.textContent = fleetView.loading ? "loading…" : "Load the next " + PAGE_SIZE;
  }

  function row(a) {
    const cordoned = a.schedulable === false;
    const claim = a.claim;
    return h("tr", { "data-agent-id": a.agent_id, "data-status": a.status, "data-cordoned": cordoned, "data-holder": claim ? claim.holder : null },
      h("td", {}, a.agent_id),
      h("td", {}, h("span", { class: "status s-" + a.status }, a.status),
        cordoned ? h("div", { class: "cordoned" }, "cordoned" + (a.cordon_reason ? ": " + a.cordon_reason : "")) : null),
      h("td", {}, ticking("since", a.last_transition_at)),
      h("td", {}, ticking("ago", a.last_heartbeat_at)),
      h("td", {}, a.status === "EXHAUSTED" ? [
        ticking("until", a.recovery_at),
        a.recovery_hint ? h("div", { class: "hint" }, a.recovery_hint) : null,
        a.recovery_source ? h("div", { class: "hint" }, "from " + a.recovery_source.toLowerCase()) : null,
      ] : ""),
      h("td", { class: "claim" }, claim ? [
        h("span", { title: fmtTime(claim.lease_expires_at) || null },
          "claimed by " + claim.holder + (claim.lease_expires_at ? " until " + clock(claim.lease_expires_at) : "")),
        h("div", { class: "hint" }, "token " + claim.fencing_token + (claim.slot_type ? " · " + claim.slot_type : "")),
      ] : ""),
      h("td", {}, Object.entries(a.labels).map(([k, v]) => h("span", { class: "label" }, k + "=" + v))),
      h("td", { class: "rotation" }, rotation(a)));
  }

  // Cordon (asking for a reason inline) or Uncordon.
  function rotation(a) {
    const id = a.agent_id;
    if (a.schedulable === false) {
      return h("button", { class: "uncordon", "data-agent-id": id, onclick: (e) => setRotation(e.target, id, "uncordon", {}) }, "Uncordon");
    }
    if (!cordoning.has(id)) {
      return h("button", { class: "cordon", "data-agent-id": id, onclick: () => {
        cordoning.set(id, "");
        drawRow(id);
        const input = rows.get(id) && rows.get(id).querySelector("input.cordon-reason");
        if (input) input.focus();
      } }, "Cordon");
    }
    const ok = h("button", { class: "cordon-confirm", "data-agent-id": id, onclick: (e) => setRotation(e.target, id, "cordon", { reason: cordoning.get(id) }) }, "Cordon");
    const cancel = () => {
      cordoning.delete(id);
      drawRow(id);
    };
    const input = h("input", { class: "cordon-reason", "data-agent-id": id, placeholder: "reason", value: cordoning.get(id),
      oninput: (e) => cordoning.set(id, e.target.value),
      onkeydown: (e) => (e.key === "Enter" ? ok.click() : e.key === "Escape" ? cancel() : null) });
    return h("span", { class: "cordon-form" }, input, ok, h("button", { class: "cordon-cancel", "data-agent-id": id, onclick: cancel }, "Cancel"));
  }

  // CordonAgent or UncordonAgent; the answer is the agent, drawn at once
  // (its transition follows on the stream).
  async function setRotation(button, id, action, body) {
    button.disabled = true;
    try {
      const answer = await post("agents/" + encodeURIComponent(id) + "/" + action, body);
      cordoning.delete(id);
      if (answer.agent && fleet.has(id)) mergeAgent(answer.agent);
      changed("agent", { agent_id: id });
    } catch (e) {
      button.disabled = false;
      notice(action + " of " + id + " failed: " + e.message);
    }
  }

  const rows = new Map(); // agent_id -> tr
  function drawTable() {
    rows.clear();
    if (fleetView.error) {
      failed(body, fleetView.error);
    } else if (!fleetView.loaded) {
      body.replaceChildren(h("p", { class: "muted" }, "loading…"));
    } else {
      const trs = [...fleet.values()].map((a) => {
        const tr = row(a);
        rows.set(a.agent_id, tr);
        return tr;
      });
      const filtered = fleetView.status || fleetView.labels;
      body.replaceChildren(table(["agent", "status", "in status", "last heartbeat", "recovery", "claim", "labels", ""], trs,
        filtered ? "no agent matches the filter" : "no agents registered"));
    }
  }

  // One agent's row redrawn or, for an agent gone, removed (for an agent new
  // to the table, the table is redrawn).
  function drawRow(id) {
    const old = rows.get(id);
    const agent = fleet.get(id);
    if (old && !agent) {
      old.remove();
      rows.delete(id);
      cordoning.delete(id);
      if (!fleet.size) drawTable();
      return true;
    }
    if (!old || !agent) return false;
    const tr = row(agent);
    old.replaceWith(tr);
    rows.set(id, tr);
    return true;
  }

  // Changes arriving together (a burst of transitions) are drawn once per
  // frame: the counts, the rows that changed, the whole table only when its
  // set of rows did.
  let queued = false;
  let whole = true;
  const dirty = new Set();
  function flush() {
    queued = false;
    // A reason being typed keeps its focus across redraws.
    const active = document.activeElement;
    const typing = active && active.matches("input.cordon-reason") ? active.dataset.agentId : null;
    drawCounts();
    if (whole) drawTable();
    else for (const id of dirty) if (!drawRow(id) && fleet.has(id)) { drawTable(); break; }
    whole = false;
    dirty.clear();
    const input = typing !== null && rows.has(typing) ? rows.get(typing).querySelector("input.cordon-reason") : null;
    if (input && input !== document.activeElement) {
      input.focus();
      input.setSelectionRange(input.value.length, input.value.length);
    }
    // Busy while a query is pending or a page on its way (the tests wait on it).
    body.toggleAttribute("aria-busy", fleetView.loading || timer !== null);
  }
  flush();
  return (what, detail) => {
    if (what === "transition") dirty.add(detail.agent_id);
    else if (what === "agent") dirty.add(detail.agent_id);
    else if (what === "page" || what === "heartbeats") whole = true;
    else if (what === "busy") body.setAttribute("aria-busy", "true");
    if (queued) return;
    queued = true;
    requestAnimationFrame(flush);
  };
}

// Quota pools (ListQuotaPools): parked and releasing pools first, each with
// the window holding it and its deadline, members by status, how many it
// holds, and (GetQuotaPool) when its next member is released. Read again when
// a transition parks or releases a pool member, and every 10 s (a window
// lifts without a transition).
let poolsTimer = null;
function poolsPage(root) {
  const parkedOnly = h("input", { type: "checkbox", id: "pools-parked", onchange: () => load() });
  const body = h("div", { id: "pools-table", "aria-busy": "true" });
  append(root, h("div", { class: "reconnect-banner" }),
    h("p", { class: "muted" }, "Quota pools: agents sharing a provider limit. A member's limit report parks the pool and its idle members; when the last window lifts, a canary goes first and the rest follow spread out."),
    h("div", { class: "filters" }, h("label", {}, parkedOnly, " parked or releasing only")), body);
  setConnection(connState.dataset.state, connState.textContent);
  let generation = 0;
  const order = { PARKED: 0, RELEASING: 1, OPEN: 2 };

  async function load() {
    const mine = ++generation;
    body.setAttribute("aria-busy", "true");
    try {
      const page = await api("pools" + query({ parked: parkedOnly.checked ? "1" : "" }));
      if (mine !== generation) return;
      const pools = page.pools.slice().sort((a, b) => (order[a.phase] ?? 3) - (order[b.phase] ?? 3) || a.name.localeCompare(b.name));
      // The next release of each releasing pool.
      const next = {};
      await Promise.all(pools.filter((p) => p.phase === "RELEASING").map(async (p) => {
        try {
          next[p.name] = (await api("pool" + query({ name: p.name }))).next_release_at;
        } catch (_) { /* left blank */ }
      }));
      if (mine !== generation) return;
      draw(pools, next);
    } catch (e) {
      if (mine !== generation) return;
      failed(body, e);
    }
    body.removeAttribute("aria-busy");
  }

  function draw(pools, next) {
    body.replaceChildren(table(["pool", "phase", "windows in force", "parked until", "members", "held", "canary", "next release"], pools.map((p) => {
      const windows = p.windows.filter((w) => w.in_force);
      const members = Object.entries(p.members).map(([s, n]) => s + " " + n).join(", ");
      return h("tr", { "data-pool": p.name, "data-phase": p.phase },
        h("td", {}, p.name),
        h("td", { class: "phase" }, p.phase),
        h("td", { title: windows.map((w) => w.window + ": " + w.hint).join("\n") }, windows.map((w) => w.window + " (" + w.source + ")").join(", ")),
        h("td", { title: fmtTime(p.parked_until) }, p.parked_until ? ticking("until", p.parked_until) : ""),
        h("td", {}, members),
        h("td", { class: "num" }, p.held),
        h("td", {}, p.canary_agent_id || ""),
        h("td", { class: "next-release", title: fmtTime(next[p.name]) }, next[p.name] ? ticking("until", next[p.name]) : ""));
    }), parkedOnly.checked ? "no parked pool" : "no quota pool: agents name theirs when they register"));
  }

  load();
  clearInterval(poolsTimer);
  poolsTimer = setInterval(() => {
    if (route() !== "pools") clearInterval(poolsTimer);
    else if (!document.hidden) load();
  }, 10000);
  let queued = null;
  return (what, t) => {
    if (what !== "transition" || !t || !t.quota_pool || queued) return;
    queued = setTimeout(() => {
      queued = null;
      load();
    }, 100);
  };
}

// The active claims (ListClaims), a page at a time, filtered by holder:
// read again when a transition makes, ends or drops a claim, and every 15 s
// (a renewal moves a lease without a transition).
let claimsTimer = null;
function claimsPage(root) {
  const holder = h("input", { id: "claims-holder", placeholder: "holder", oninput: () => {
    clearTimeout(pending);
    pending = setTimeout(() => load(CLAIMS_PAGE), 300);
  } });
  const shown = h("span", { class: "muted", id: "claims-shown" });
  const body = h("div", { id: "claims-table", "aria-busy": "true" });
  const more = h("button", { id: "claims-more", hidden: true, onclick: () => load(claims.length + CLAIMS_PAGE) }, "Load the next " + CLAIMS_PAGE);
  append(root, h("div", { class: "reconnect-banner" }),
    h("p", { class: "muted" }, "Active claims, by agent: who holds each, its fencing token and when its lease ends unless renewed."),
    h("div", { class: "filters" }, holder, shown), body, h("div", { class: "more" }, more));
  setConnection(connState.dataset.state, connState.textContent);
  let claims = [];
  let generation = 0;
  let pending = null;

  // The first `want` claims (whole pages of at most 1000).
  async function load(want) {
    const mine = ++generation;
    body.setAttribute("aria-busy", "true");
    try {
      const got = [];
      let token = "";
      do {
        const page = await api("claims" + query({ holder: holder.value.trim(), page_size: Math.min(1000, want - got.length), page_token: token }));
        if (mine !== generation) return;
        got.push(...page.claims);
        token = page.next_page_token;
      } while (token && got.length < want);
      claims = got;
      draw(token);
    } catch (e) {
      if (mine !== generation) return;
      failed(body, e);
    }
    body.removeAttribute("aria-busy");
  }

  function draw(next) {
    shown.textContent = claims.length.toLocaleString("en-US") + (next ? "+" : "") + " shown";
    more.hidden = !next;
    body.replaceChildren(table(["agent", "holder", "token#", "slot", "claimed", "lease expires"], claims.map((c) =>
      h("tr", { "data-claim-id": c.claim_id, "data-agent-id": c.agent_id, "data-holder": c.holder },
        h("td", {}, c.agent_id), h("td", {}, c.holder), h("td", { class: "num" }, c.fencing_token), h("td", {}, c.slot_type),
        h("td", { title: fmtTime(c.claimed_at) }, ticking("ago", c.claimed_at)),
        h("td", { class: "lease", title: fmtTime(c.lease_expires_at) }, clock(c.lease_expires_at), " ",
          h("span", { class: "muted" }, "(", ticking("until", c.lease_expires_at), ")")))),
    holder.value.trim() ? "no claim held by " + holder.value.trim() : "no active claims"));
  }

  load(CLAIMS_PAGE);
  clearInterval(claimsTimer);
  claimsTimer = setInterval(() => {
    if (route() !== "claims") clearInterval(claimsTimer);
    else if (!document.hidden) load(Math.max(CLAIMS_PAGE, claims.length));
  }, 15000);
  let queued = null;
  return (what, t) => {
    if (what !== "transition" || !touchesClaims(t) || queued) return;
    // A burst of claims is read once.
    queued = setTimeout(() => {
      queued = null;
      load(Math.max(CLAIMS_PAGE, claims.length));
    }, 100);
  };
}

// The live transition feed.
function feedPage(root) {
  const list = h("ol", { class: "feed", id: "feed" });
  append(root, h("div", { class: "reconnect-banner" }),
    h("p", { class: "muted" }, "Transitions as they are committed, newest first: the last 100 before the page was opened, then live."), list);
  setConnection(connState.dataset.state, connState.textContent);
  // FROM → TO; a change that keeps the status (a cordon) shows it once,
  // and a deleted agent's last transition goes to "gone".
  function move(t) {
    if (GONE.has(t.cause)) return [h("span", { class: "s-" + t.from }, t.from), " → ", h("span", { class: "muted" }, "gone")];
    if (t.from === t.to) return h("span", { class: "status s-" + t.to }, t.to);
    return [t.from === NEW ? h("span", { class: "muted" }, "new") : h("span", { class: "s-" + t.from }, t.from),
      " → ", h("span", { class: "status s-" + t.to }, t.to)];
  }
  function item(t) {
    return h("li", { "data-revision": t.revision, "data-agent-id": t.agent_id, "data-cause": t.cause },
      h("span", { class: "muted" }, "#" + t.revision),
      h("span", {}, fmtTime(t.occurred_at)),
      h("span", {}, t.agent_id),
      h("span", {}, move(t)),
      h("span", { class: "muted" }, CAUSE_TEXT[t.cause] || t.cause.toLowerCase().replace(/_/g, " "), t.actor ? " by " + t.actor : ""));
  }
  function update(what, t) {
    if (what === "transition") list.prepend(item(t));
    else if (what === "history" || !list.children.length) list.replaceChildren(...feed.map(item));
    while (list.children.length > FEED_MAX) list.lastChild.remove();
  }
  update();
  return update;
}

// Healing: the remediation brakes (GetHealingPolicy: pauses, each group's
// unhealthy share, open breakers, spent retry budgets) with Pause and Resume
// buttons (PauseHealing, ResumeHealing: operators; a refusal is a notice),
// the latest decisions on PlanRecovery (ListHealingDecisions), then errors by
// type, plans by strategy and what the planner learned. Read again every
// 15 s (the brakes move without a transition) and after a pause or resume.
const DECISIONS = 50;
let healingTimer = null;
function healingPage(root) {
  const reason = h("input", { id: "pause-reason", placeholder: "why pause healing?", onkeydown: (e) => (e.key === "Enter" ? pauseButton.click() : null) });
  const scope = h("select", { id: "pause-group" }, h("option", { value: "" }, "whole fleet"));
  scope.hidden = true;
  const pauseButton = h("button", { id: "pause-healing", onclick: (e) => pause(e.target) }, "Pause healing");
  const brakes = h("div", { id: "healing-brakes", "aria-busy": "true" }, h("p", { class: "muted" }, "loading…"));
  const stats = h("div", { id: "healing-stats" });
  append(root,
    h("h2", {}, "Brakes"),
    h("p", { class: "muted" }, "While healing is paused, or a group has as many agents under remediation or offline as its share allows, PlanRecovery answers no plan; every decision is recorded below."),
    h("div", { class: "filters pause-form" }, reason, scope, pauseButton),
    brakes, stats);
  let generation = 0;

  async function load() {
    const mine = ++generation;
    brakes.setAttribute("aria-busy", "true");
    try {
      const [st, policy, page] = await Promise.all([
        api("healing"),
        api("healing/policy"),
        api("healing/decisions" + query({ limit: DECISIONS })),
      ]);
      if (mine !== generation) return;
      drawBrakes(policy, page.decisions);
      drawStats(st);
    } catch (e) {
      if (mine !== generation) return;
      failed(brakes, e);
    }
    brakes.removeAttribute("aria-busy");
  }

  // PauseHealing of the fleet (or the group chosen); the reason is required.
  async function pause(button) {
    const why = reason.value.trim();
    if (!why) {
      notice("pausing healing needs a reason");
      reason.focus();
      return;
    }
    button.disabled = true;
    try {
      await post("healing/pause", { group: scope.value, reason: why });
      reason.value = "";
      notice("");
      await load();
    } catch (e) {
      notice("pause failed: " + e.message);
    }
    button.disabled = false;
  }

  async function resume(button, group) {
    button.disabled = true;
    try {
      await post("healing/resume", { group });
      notice("");
      await load();
    } catch (e) {
      button.disabled = false;
      notice("resume failed: " + e.message);
    }
  }

  const scopeName = (group) => (group ? "group " + group : "whole fleet");
  const seconds = (x) => (x === undefined || x === null ? "?" : span(x * 1000));

  function policyText(p) {
    const parts = [
      "at most " + p.max_unhealthy_percent + " % unhealthy (at least " + p.min_unhealthy + ")" + (p.group_by ? " per " + p.group_by + " and fleet-wide" : " fleet-wide"),
      p.max_plans_per_minute + " plans/min" + (p.group_by ? ", " + p.max_group_plans_per_minute + "/min per group" : ""),
      "retry budget " + p.retry_budget + " per " + seconds(p.retry_window_seconds) + " (back after " + seconds(p.min_healthy_period_seconds) + " healthy)",
      "breaker after " + p.breaker_failures + " failures in a row, trial after " + seconds(p.breaker_cooldown_seconds),
    ];
    if (p.dry_run) parts.push("DRY RUN: plans are decided, never handed out");
    return parts.join(" · ");
  }

  function drawBrakes(view, decisions) {
    // The scopes a pause may name: the fleet, and each group once grouped.
    const chosen = scope.value;
    const groups = view.shares.filter((s) => s.group).map((s) => s.group);
    scope.replaceChildren(h("option", { value: "" }, "whole fleet"), ...groups.map((g) => h("option", { value: g }, "group " + g)));
    scope.value = groups.includes(chosen) ? chosen : "";
    scope.hidden = !view.policy.group_by;
    const fleetPause = view.pauses.find((p) => !p.group);
    brakes.replaceChildren(
      h("p", { class: "muted", id: "healing-policy" }, "Policy: " + policyText(view.policy)),
      fleetPause
        ? h("div", { class: "paused-banner", id: "fleet-paused" }, "Healing is paused for the whole fleet: " + fleetPause.reason,
          " (by " + fleetPause.paused_by + ", ", h("span", { title: fmtTime(fleetPause.paused_at) }, ticking("ago", fleetPause.paused_at)), ")")
        : null,
      h("h2", {}, "Pauses"),
      h("div", { id: "healing-pauses" }, table(["scope", "reason", "paused by", "since", ""], view.pauses.map((p) =>
        h("tr", { "data-group": p.group, class: "paused" },
          h("td", {}, scopeName(p.group)), h("td", {}, p.reason), h("td", {}, p.paused_by),
          h("td", { title: fmtTime(p.paused_at) }, ticking("ago", p.paused_at)),
          h("td", { class: "rotation" }, h("button", { class: "resume-healing", "data-group": p.group, onclick: (e) => resume(e.target, p.group) }, "Resume")))),
      "healing is not paused")),
      h("h2", {}, "Unhealthy share"),
      h("div", { id: "healing-shares" }, table(["scope", "unhealthy#", "counted#", "allowed#", ""], view.shares.map((s) => {
        const full = s.unhealthy >= s.allowed;
        return h("tr", { "data-group": s.group, "data-full": full, class: full ? "over" : null },
          h("td", {}, s.group ? s.group : "whole fleet"), h("td", { class: "num" }, s.unhealthy), h("td", { class: "num" }, s.counted),
          h("td", { class: "num" }, s.allowed), h("td", { class: "muted" }, full ? "at its share: no new plan here" : ""));
      }), "no agents counted")),
      h("h2", {}, "Open breakers"),
      h("div", { id: "healing-breakers" }, table(["error type", "strategy", "state", "since", "retry at"], view.open_breakers.map((b) =>
        h("tr", { "data-state": b.state },
          h("td", {}, b.error_type), h("td", {}, b.strategy), h("td", { class: "error" }, b.state),
          h("td", { title: fmtTime(b.since) }, b.since ? ticking("ago", b.since) : ""),
          h("td", { title: fmtTime(b.retry_at) }, b.retry_at ? ticking("until", b.retry_at) : ""))), "every breaker is closed")),
      h("h2", {}, "Spent retry budgets"),
      h("div", { id: "healing-budgets" }, table(["agent", "plans#"], view.spent_budgets.map((b) =>
        h("tr", { "data-agent-id": b.agent_id }, h("td", {}, b.agent_id), h("td", { class: "num" }, b.plans))), "no agent has spent its retry budget")),
      h("h2", {}, "Latest decisions"),
      h("div", { id: "healing-decisions" }, table(["decided", "verdict", "reason", "agent", "event#", "message"], decisions.map((d) =>
        h("tr", { "data-decision": d.id, "data-verdict": d.verdict, "data-reason": d.reason || null, "data-agent-id": d.agent_id },
          h("td", { title: fmtTime(d.decided_at) }, d.decided_at ? ticking("ago", d.decided_at) : ""),
          h("td", { class: "verdict v-" + d.verdict }, d.verdict),
          h("td", {}, d.reason || ""),
          h("td", {}, d.agent_id),
          h("td", { class: "num" }, d.error_event_id),
          h("td", { class: "muted" }, d.message, d.actor ? " (asked by " + d.actor + ")" : ""))), "no PlanRecovery decided yet")));
  }

  function drawStats(st) {
    const maxErrors = Math.max(1, ...st.errors_by_type.map((e) => e.count));
    const byStrategy = new Map();
    for (const p of st.patterns) {
      const s0 = byStrategy.get(p.strategy) || { uses: 0, successes: 0, failures: 0 };
      s0.uses += p.use_count;
      s0.successes += p.successes;
      s0.failures += p.failures;
      byStrategy.set(p.strategy, s0);
    }
    const pct = (x) => (100 * x).toFixed(0) + " %";
    const bar = (n, max) => {
      const el = h("div", { class: "bar" });
      el.style.width = Math.round((200 * n) / max) + "px";
      return el;
    };
    stats.replaceChildren(
      h("h2", {}, "Errors and recoveries"),
      h("div", { class: "cards" }, card(st.total_errors, "errors"), card(st.errors_last_hour, "last hour"),
        card(st.active_recoveries, "active recoveries"), card(pct(st.overall_success_rate), "recovered")),
      h("h2", {}, "Errors by type"),
      table(["type", "count#", ""], st.errors_by_type.map((e) =>
        h("tr", {}, h("td", {}, e.error_type), h("td", { class: "num" }, e.count), h("td", {}, bar(e.count, maxErrors)))), "no errors recorded"),
      h("h2", {}, "Plans by strategy"),
      table(["strategy", "plans#", "succeeded#", "failed#"], [...byStrategy].map(([name, x]) =>
        h("tr", {}, h("td", {}, name), h("td", { class: "num" }, x.uses), h("td", { class: "num" }, x.successes), h("td", { class: "num" }, x.failures))), "no plans yet"),
      h("h2", {}, "Learned success rates"),
      table(["error type", "context", "strategy", "success#", "outcomes#", "mean recovery#"], st.patterns.map((p) =>
        h("tr", {}, h("td", {}, p.error_type), h("td", { class: "muted" }, p.context_signature), h("td", {}, p.strategy),
          h("td", { class: "num" }, pct(p.success_rate)), h("td", { class: "num" }, p.successes + p.failures),
          h("td", { class: "num" }, p.mean_recovery_seconds !== undefined ? span(p.mean_recovery_seconds * 1000) : ""))), "nothing learned yet"));
  }

  load();
  clearInterval(healingTimer);
  healingTimer = setInterval(() => {
    if (route() !== "healing") clearInterval(healingTimer);
    else if (!document.hidden) load();
  }, 15000);
}

// Usage: tokens per day as a stacked SVG bar chart, by model or by user.
const PALETTE = ["#2563b8", "#c2410c", "#2f7d4f", "#7a4bc2", "#b8860b", "#0e7490", "#be185d", "#4b5563"];

function usagePage(root) {
  const by = h("select", { id: "usage-by", onchange: () => load() }, h("option", { value: "model" }, "by model"), h("option", { value: "user" }, "by user"));
  const days = h("select", { id: "usage-days", onchange: () => load() }, [14, 30, 90].map((n) => h("option", { value: n }, "last " + n + " days")));
  const body = h("div", {});
  append(root, h("div", { class: "filters" }, by, days), body);

  async function load() {
    body.replaceChildren(h("p", { class: "muted" }, "loading…"));
    try {
      const since = new Date(Date.now() - Number(days.value) * 86400000);
      since.setUTCHours(0, 0, 0, 0);
      const [daily, groups] = await Promise.all([
        api("usage" + query({ group_by: "day", since: since.toISOString() })),
        api("usage" + query({ group_by: by.value, since: since.toISOString() })),
      ]);
      // Each day split by the chosen grouping: one GetUsage per day.
      const split = await Promise.all(daily.rows.map((d) => {
        const start = new Date(d.key + "T00:00:00Z");
        const end = new Date(start.getTime() + 86400000);
        return api("usage" + query({ group_by: by.value, since: start.toISOString(), until: end.toISOString() }));
      }));
      const keys = groups.rows.map((r) => r.key);
      // Every day of the period, those without usage too.
      const parts = new Map(daily.rows.map((d, i) => [d.key, split[i].rows]));
      const everyDay = [];
      for (let t = since.getTime(); t <= Date.now(); t += 86400000) {
        const day = new Date(t).toISOString().slice(0, 10);
        everyDay.push({ day, parts: parts.get(day) || [] });
      }
      body.replaceChildren(
        chart(everyDay, keys),
        h("h2", {}, "Totals " + by.selectedOptions[0].textContent),
        table([by.value, "input#", "output#", "cache write#", "cache read#", "total#", "messages#"],
          groups.rows.concat(groups.totals ? [Object.assign({}, groups.totals, { key: "all" })] : []).map((r) =>
            h("tr", {}, h("td", {}, r.key), ...["input_tokens", "output_tokens", "cache_creation_tokens", "cache_read_tokens", "total_tokens", "messages"]
              .map((f) => h("td", { class: "num" }, r[f].toLocaleString())))), "no usage in this period"));
    } catch (e) {
      failed(body, e);
    }
  }
  load();
}

function chart(days, keys) {
  if (!days.length) return h("p", { class: "muted" }, "no usage in this period");
  const color = (k) => PALETTE[Math.max(0, keys.indexOf(k)) % PALETTE.length];
  const max = Math.max(1, ...days.map((d) => d.parts.reduce((n, p) => n + p.total_tokens, 0)));
  const W = 900, H = 260, left = 60, bottom = 40, top = 10;
  const step = (W - left) / days.length, bw = Math.min(40, Math.max(2, step * 0.7));
  const y = (v) => H - bottom - ((H - bottom - top) * v) / max;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": "tokens per day", id: "usage-chart" });
  for (const f of [0, 0.5, 1]) {
    svg.append(s("line", { x1: left, x2: W, y1: y(max * f), y2: y(max * f), stroke: "#dde1e6" }),
      s("text", { x: left - 6, y: y(max * f) + 4, "text-anchor": "end", "font-size": 11, fill: "#66707c" }, compact(max * f)));
  }
  days.forEach((d, i) => {
    let base = 0;
    const x = left + i * step + (step - bw) / 2;
    for (const p of d.parts) {
      const rect = s("rect", { x, y: y(base + p.total_tokens), width: bw, height: y(base) - y(base + p.total_tokens), fill: color(p.key), "data-day": d.day, "data-key": p.key });
      rect.append(s("title", {}, `${d.day} ${p.key}: ${p.total_tokens.toLocaleString()} tokens`));
      svg.append(rect);
      base += p.total_tokens;
    }
    if (i % Math.ceil(days.length / 15) === 0) {
      svg.append(s("text", { x: x + bw / 2, y: H - bottom + 14, "text-anchor": "middle", "font-size": 10, fill: "#66707c" }, d.day.slice(5)));
    }
  });
  const legend = h("div", { class: "legend" }, keys.map((k) => {
    const swatch = h("i", {});
    swatch.style.background = color(k);
    return h("span", {}, swatch, k);
  }));
  return h("div", { class: "chart" }, h("div", { class: "muted" }, "tokens per day (UTC)"), svg, legend);
}

function compact(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(1) + " G";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " k";
  return String(Math.round(n));
}

// Who or what started a run: the scheduler, a caller by name, or unknown
// (runs recorded before the history kept it).
function runTrigger(r) {
  if (r.trigger === "SCHEDULER") return "scheduler";
  if (r.trigger === "CALL") return "call by " + r.actor;
  return "unknown";
}

function runDuration(ms) {
  if (ms === undefined) return "";
  return ms < 1000 ? ms + " ms" : span(ms);
}

// The session pipeline: processors, last runs, recent runs, failing and dead sessions.
function pipelinePage(root) {
  root.append(h("p", { class: "muted" }, "loading…"));
  async function load() {
    try {
      const { processors } = await api("processors");
      const sessions = await Promise.all(processors.map(async (p) => {
        const [failing, dead] = await Promise.all(["failed", "dead"].map((status) =>
          api("sessions" + query({ processor: p.name, status, page_size: 100 }))));
        return failing.states.concat(dead.states);
      }));
      const { runs } = await api("runs" + query({ page_size: 20 }));
      root.replaceChildren(
        h("h2", {}, "Processors"),
        table(["processor", "version#", "every", "state", "last run", "processed#", "skipped#", "failed#", "dead#"], processors.map((p) => {
          const r = p.last_run || {};
          return h("tr", { "data-processor": p.name }, h("td", {}, p.name), h("td", { class: "num" }, p.version),
            h("td", {}, p.interval_seconds ? span(p.interval_seconds * 1000) : "on demand"),
            h("td", {}, p.running ? "running" : "idle"),
            h("td", {}, p.last_run_at ? ticking("ago", p.last_run_at) : "never", r.root_error ? h("div", { class: "error" }, r.root_error) : null),
            ...["processed", "skipped", "failed", "dead"].map((f) => h("td", { class: "num" }, r[f] === undefined ? "" : r[f])));
        }), "no processors"),
        h("h2", {}, "Recent runs"),
        table(["started", "processor", "started by", "took", "scanned#", "processed#", "skipped#", "failed#", "dead#", "first errors"], runs.map((r) => {
          const st = r.stats;
          return h("tr", { "data-run": r.id, "data-processor": r.processor, "data-trigger": r.trigger },
            h("td", { title: fmtTime(r.started_at) }, r.started_at ? ticking("ago", r.started_at) : ""),
            h("td", {}, r.processor), h("td", {}, runTrigger(r)), h("td", { class: "num" }, runDuration(r.duration_ms)),
            ...["scanned", "processed", "skipped", "failed", "dead"].map((f) => h("td", { class: "num" }, st[f])),
            h("td", { class: "muted" },
              st.root_error ? h("div", { class: "error" }, st.root_error) : null,
              ...st.errors.map((e) => h("div", { class: "run-error" }, e.session + ": " + e.error))));
        }), "no runs recorded"),
        h("h2", {}, "Failing and dead sessions"),
        table(["processor", "session", "status", "attempts#", "next attempt", "last error", ""], sessions.flat().map((st) =>
          h("tr", { "data-session": st.session, "data-status": st.status },
            h("td", {}, st.processor), h("td", {}, st.session), h("td", { class: st.status === "DEAD" ? "error" : "" }, st.status),
            h("td", { class: "num" }, st.attempts), h("td", {}, st.next_attempt_at ? ticking("until", st.next_attempt_at) : ""),
            h("td", { class: "muted" }, st.last_error),
            h("td", {}, h("button", { class: "retry", "data-session": st.session, onclick: (e) => retry(e.target, st) }, "Retry")))),
          "no failing or dead sessions"));
    } catch (e) {
      failed(root, e);
    }
  }
  async function retry(button, st) {
    button.disabled = true;
    button.textContent = "retrying…";
    try {
      await post("sessions/retry", { processor: st.processor, session: st.session });
      await load();
    } catch (e) {
      button.disabled = false;
      button.textContent = "Retry";
      notice("retry failed: " + e.message);
    }
  }
  load();
}

window.addEventListener("hashchange", render);
render();
watch.start();
// For the browser tests and curious operators.
window.fleetcare = { fleet, fleetView, feed, watch, counts: () => counts };
