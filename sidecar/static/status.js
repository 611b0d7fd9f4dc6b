// The status page: polls the sidecar's /stats once a second and shows it. Everything shown is
// text from /stats set with textContent (never parsed as HTML), so a key name or an error
// message cannot inject markup.

import { drawHistogram, drawSparkline } from "./charts.js";

const REFRESH_MS = 1000;
const TIMEOUT_MS = 3000;
const HISTORY_MS = 5 * 60 * 1000;
const TOKEN_STORAGE = "llmserve-sidecar-token";
const MAX_KEY_ROWS = 50;
// The gap between tokens of a stream at 30 tokens/s, a bucket edge of the inter-token histogram.
const GAP_AT_30_TOKENS_PER_SECOND = 1 / 30;

const page = {
  sort: { column: "requests", descending: true },
  history: [],
  stats: null,
  lastSuccess: null,
  refreshes: 0,
};

const $ = (selector) => document.querySelector(selector);

function setStat(name, text) {
  for (const node of document.querySelectorAll(`[data-stat="${name}"]`)) node.textContent = text;
}

function setClass(node, name, on) {
  node.classList.toggle(name, Boolean(on));
}

const count = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));

function rate(x) {
  if (x === null || x === undefined) return "—";
  return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
}

function seconds(s) {
  if (s === null || s === undefined) return "—";
  if (s < 1) return `${(s * 1000).toFixed(1)} ms`;
  return `${s.toFixed(2)} s`;
}

// Bucket edges: short, and exact enough to tell 25 ms from 33.3 ms.
function edge(s) {
  if (s < 1) return `${Number((s * 1000).toPrecision(3))} ms`;
  return `${Number(s.toPrecision(3))} s`;
}

function duration(s) {
  if (s === null || s === undefined) return "—";
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

const percent = (f) => (f === null || f === undefined ? "—" : `${Math.round(f * 100)}%`);
const share = (f) => (f === null || f === undefined ? "—" : `${(f * 100).toFixed(1)}%`);
const clock = (date) => date.toLocaleTimeString("en-GB", { hour12: false });

// The server the page is about: the most recent one still reporting, else the last one seen.
function primaryServer(stats) {
  return stats.servers.find((server) => server.reporting) ?? stats.servers[0] ?? null;
}

// Latency is drawn for the served model; requests naming other models are errors, not traffic.
function primaryModel(stats, server) {
  if (server && stats.models[server.model]) return server.model;
  const busiest = Object.entries(stats.models).sort((a, b) => b[1]["5m"].requests - a[1]["5m"].requests);
  return busiest.length ? busiest[0][0] : null;
}

function serverHealth(server) {
  if (!server) return { text: "no server yet", level: "warn" };
  if (!server.reporting) return { text: "down", level: "bad" };
  if (server.loaded === false) return { text: "stopped", level: "bad" };
  if (server.draining) return { text: "draining", level: "warn" };
  if (server.ready === false) return { text: "loading", level: "warn" };
  return { text: "ready", level: "ok" };
}

function serverProblem(server) {
  if (!server) return "No server has reported to this sidecar yet.";
  if (!server.reporting) {
    const silent = server.seconds_since_report ?? server.seen_seconds;
    return `Lost the server: no report from it for ${Math.round(silent)} s. It is down, or cannot reach this sidecar's event socket.`;
  }
  if (server.loaded === false) return "The server has stopped: its model is unloaded.";
  if (server.draining) return "The server is draining: streams in flight finish, new requests are refused.";
  return null;
}

function showBanner(text, level) {
  const banner = $("#banner");
  banner.hidden = !text;
  banner.textContent = text ?? "";
  banner.dataset.level = level ?? "";
}

function renderHeader(stats, server) {
  $("#model").textContent = server?.model ?? primaryModel(stats, null) ?? "no model reported yet";
  $("#engine").textContent = server ? `· engine ${server.engine ?? "not reported yet"}` : "";
  $("#updated").textContent = `updated ${clock(new Date())}`;
}

function renderCards(stats, server) {
  const health = serverHealth(server);
  setStat("server_health", health.text);
  $("#card-server").dataset.level = health.level;
  const reporting = stats.sidecar.servers_reporting;
  $("#server-detail").textContent = server
    ? `${reporting} reporting · seen for ${duration(server.seen_seconds)}`
    : "start llmserve serve with this sidecar's settings";
  setStat("sidecar_health", "ok");
  $("#card-sidecar").dataset.level = stats.sidecar.events_lost > 0 ? "warn" : "ok";
  setStat("events_lost", count(stats.sidecar.events_lost));
  setStat("sidecar_uptime", duration(stats.sidecar.uptime_seconds));

  const minute = Object.values(stats.models).map((model) => model["1m"]);
  const requests = minute.reduce((sum, m) => sum + m.requests_per_second, 0);
  const tokens = minute.reduce((sum, m) => sum + m.tokens_per_second, 0);
  setStat("requests_per_second", rate(requests));
  setStat("tokens_per_second", rate(tokens));
  const live = server?.reporting ? server : null;
  setStat("running", count(live?.running));
  setStat("waiting", count(live?.waiting));
  setStat("kv_usage", percent(live?.kv_usage));

  const now = Date.now();
  page.history.push({ t: now, requests, tokens });
  while (page.history.length && page.history[0].t < now - HISTORY_MS) page.history.shift();
  drawSparkline($("#spark-requests"), page.history.map((p) => ({ t: p.t, v: p.requests })), HISTORY_MS);
  drawSparkline($("#spark-tokens"), page.history.map((p) => ({ t: p.t, v: p.tokens })), HISTORY_MS);
}

function renderLatency(stats, server) {
  const name = primaryModel(stats, server);
  const recent = name ? stats.models[name]["5m"] : null;
  for (const [prefix, field] of [["ttft", "ttft"], ["itl", "inter_token"]]) {
    for (const q of ["p50", "p95", "p99"]) {
      setStat(`${prefix}_${q}`, seconds(recent?.[`${field}_${q}_seconds`]));
    }
  }
  const empty = (edges) => ({ edges, counts: new Array(edges.length + 1).fill(0) });
  const ttft = recent?.ttft_histogram ?? empty([0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.2, 0.5, 1]);
  const itl = recent?.inter_token_histogram ?? empty([0.01, 0.025, GAP_AT_30_TOKENS_PER_SECOND, 0.04, 0.05, 0.1]);
  drawHistogram($("#chart-ttft"), ttft, { format: edge });
  drawHistogram($("#chart-itl"), itl, {
    format: edge,
    threshold: { value: GAP_AT_30_TOKENS_PER_SECOND, label: "30 tokens/s" },
  });
}

function keyRows(stats) {
  return Object.entries(stats.keys).map(([name, entry]) => {
    const w = entry["5m"];
    const limits = Object.entries(entry.limits ?? {});
    const fullest = limits.sort((a, b) => b[1].utilization - a[1].utilization)[0];
    return {
      name,
      requests: w.requests,
      tokens: w.prompt_tokens + w.completion_tokens,
      // Of the service the fair scheduler gave every key in the last minute, as requests finished.
      share: entry["1m"].service_share,
      rate_limited: w.rate_limited,
      errors: w.errors,
      limit_use: fullest ? fullest[1].utilization : null,
      limit_text: fullest ? `${percent(fullest[1].utilization)} ${fullest[0]}` : "no limits",
      limit_title: limits.map(([limit, use]) => `${limit}: ${percent(use.utilization)} of ${count(use.limit)}`).join(", "),
    };
  });
}

function compareRows(column, descending) {
  return (a, b) => {
    const x = a[column] ?? -1;
    const y = b[column] ?? -1;
    const order = typeof x === "string" ? x.localeCompare(y) : x - y;
    return (descending ? -order : order) || a.name.localeCompare(b.name);
  };
}

function cell(row, text, className, title) {
  const td = row.insertCell();
  td.textContent = text;
  // The column's name, which a narrow screen shows beside the value instead of a header row.
  td.dataset.label = row.closest("table").tHead.rows[0].cells[td.cellIndex].textContent;
  if (className) td.className = className;
  if (title) td.title = title;
  return td;
}

function renderKeys(stats) {
  const rows = keyRows(stats).sort(compareRows(page.sort.column, page.sort.descending));
  const body = $("#keys tbody");
  body.replaceChildren();
  for (const row of rows.slice(0, MAX_KEY_ROWS)) {
    const tr = body.insertRow();
    tr.dataset.key = row.name;
    cell(tr, row.name, "text");
    cell(tr, count(row.requests));
    cell(tr, count(row.tokens));
    cell(tr, share(row.share));
    cell(tr, count(row.rate_limited), row.rate_limited ? "warn" : "");
    cell(tr, count(row.errors), row.errors ? "bad" : "");
    cell(tr, row.limit_text, row.limit_use >= 0.9 ? "warn" : "", row.limit_title);
  }
  $("#keys-note").textContent = rows.length === 0
    ? "No requests in the last 5 minutes."
    : rows.length > MAX_KEY_ROWS ? `Showing ${MAX_KEY_ROWS} of ${rows.length} keys.` : "";
  for (const th of document.querySelectorAll("#keys th")) {
    const sorted = th.dataset.sort === page.sort.column;
    th.setAttribute("aria-sort", sorted ? (page.sort.descending ? "descending" : "ascending") : "none");
  }
}

function renderProblems(stats) {
  const body = $("#problems tbody");
  body.replaceChildren();
  for (const problem of stats.recent_problems) {
    const tr = body.insertRow();
    tr.dataset.status = problem.status;
    cell(tr, clock(new Date(problem.ts * 1000)), "text");
    cell(tr, `${problem.status} ${problem.http_status}`, `text ${problem.status === "cancelled" ? "warn" : "bad"}`);
    cell(tr, problem.key, "text");
    const reason = problem.status === "cancelled"
      ? problem.cancel_reason ?? "cancelled"
      : [problem.error_type, problem.error].filter(Boolean).join(": ");
    cell(tr, reason, "text reason", reason);
    cell(tr, count(problem.completion_tokens));
    cell(tr, seconds(problem.e2e_s));
    cell(tr, problem.request_id, "text mono");
  }
  $("#problems-note").textContent = stats.recent_problems.length ? "" : "None since the sidecar started.";
}

function render(stats) {
  page.stats = stats;
  const server = primaryServer(stats);
  renderHeader(stats, server);
  renderCards(stats, server);
  renderLatency(stats, server);
  renderKeys(stats);
  renderProblems(stats);
  const problem = serverProblem(server);
  showBanner(problem, server?.draining && server.reporting ? "warn" : "bad");
  document.body.classList.remove("stale");
  page.refreshes += 1;
  document.body.dataset.refreshes = String(page.refreshes);
}

function showUnreachable(reason) {
  const since = page.lastSuccess ? `; what you see is from ${clock(new Date(page.lastSuccess))}` : "";
  showBanner(`Cannot reach the sidecar (${reason})${since}. Retrying every second.`, "bad");
  setStat("sidecar_health", "unreachable");
  $("#card-sidecar").dataset.level = "bad";
  document.body.classList.add("stale");
}

function askForToken(rejected) {
  const form = $("#token-form");
  if (!form.hidden) return;
  if (rejected) sessionStorage.removeItem(TOKEN_STORAGE);
  showBanner(rejected ? "That token was not accepted." : "This sidecar needs a token.", "warn");
  form.hidden = false;
  $("#token-input").focus();
}

async function poll() {
  const token = sessionStorage.getItem(TOKEN_STORAGE);
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
  try {
    const response = await fetch("/stats", {
      headers: token ? { Authorization: `Bearer ${token}` } : {},
      cache: "no-store",
      signal: controller.signal,
    });
    if (response.status === 401) {
      askForToken(token !== null);
    } else if (!response.ok) {
      showUnreachable(`HTTP ${response.status}`);
    } else {
      const stats = await response.json();
      page.lastSuccess = Date.now();
      render(stats);
    }
  } catch (error) {
    showUnreachable(error.name === "AbortError" ? "no answer in 3 s" : "connection failed");
  } finally {
    clearTimeout(timer);
    setTimeout(poll, REFRESH_MS);
  }
}

function setUp() {
  for (const th of document.querySelectorAll("#keys th")) {
    th.tabIndex = 0;
    const sortBy = () => {
      const column = th.dataset.sort;
      page.sort = {
        column,
        // A new column starts with its top entries first (names A to Z).
        descending: page.sort.column === column ? !page.sort.descending : column !== "name",
      };
      if (page.stats) renderKeys(page.stats);
    };
    th.addEventListener("click", sortBy);
    th.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        sortBy();
      }
    });
  }
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_STORAGE, $("#token-input").value);
    $("#token-input").value = "";
    $("#token-form").hidden = true;
    showBanner(null);
  });
  poll();
}

setUp();
