// Gateway console: a single page on the admin API. No build step, no
// external requests: uPlot is vendored next to this file.
// Two ways in: a user's session (an HttpOnly cookie this script never sees;
// every change carries the session's CSRF token, kept in memory only) or the
// admin token (kept in sessionStorage, this tab only, and sent only in the
// Authorization header, never in a URL). Everything user-controlled is put
// on the page as text (el() below), never as HTML.
(function () {
  "use strict";

  const API = "/admin/api";
  const TOKEN = "gateway.adminToken";
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563",
    "#65a30d", "#9333ea"];
  const $ = (id) => document.getElementById(id);
  const state = { view: null, mode: null, me: null, csrf: null, config: null, workspaces: [], keys: [], charts: {},
    log: { stack: [], cursor: null }, audit: { cursor: null }, params: {}, newKey: null, example: "curl" };
  window.gatewayConsole = state; // for debugging and for the browser tests

  // ---------------------------------------------------------------- helpers

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function td(value, cls) { return el("td", { class: cls }, value === null || value === undefined ? "" : value); }
  function num(v, digits) {
    if (v === null || v === undefined) return "";
    return Number(v).toLocaleString(undefined, { maximumFractionDigits: digits === undefined ? 0 : digits });
  }
  function money(v) { return v ? "$" + Number(v).toFixed(Math.abs(v) < 0.01 ? 6 : 2) : "$0"; }
  function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : ""; }
  function fromLocal(value) { return value ? new Date(value).getTime() / 1000 : null; }
  function toLocal(ts) {
    const d = new Date(ts * 1000);
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
  }

  function flash(message, bad) {
    const f = $("flash");
    f.textContent = message;
    f.className = bad ? "flash bad" : "flash";
    f.hidden = false;
    clearTimeout(flash.timer);
    flash.timer = setTimeout(() => { f.hidden = true; }, 6000);
  }

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // Bumped by every sign-in and sign-out. Work started for an earlier one
  // (a page that opened signed in and was signed out at once, still
  // loading) must not fill the page with that user's data, nor, when its
  // requests fail for the ended session, sign out whoever came next.
  let epoch = 0;

  async function api(method, path, body, params, opts) {
    const mine = epoch;
    const url = new URL(API + path, location.origin);
    for (const [k, v] of Object.entries(params || {})) {
      if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, v);
    }
    const headers = {};
    if (state.mode === "token") headers.Authorization = "Bearer " + sessionStorage.getItem(TOKEN);
    else if (state.csrf && method !== "GET") headers["X-CSRF-Token"] = state.csrf;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(url, { method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await r.json().catch(() => ({}));
    if (r.status === 401 && !(opts && opts.quiet) && !$("app").hidden && mine === epoch) {
      signedOut(state.mode === "token" ? "The admin token was not accepted: sign in again."
        : "Your session has ended: sign in again.");
    }
    if (!r.ok) throw new ApiError(r.status, (data.error && data.error.message) || r.statusText);
    return data;
  }

  function guard(fn) {
    return async (...args) => {
      try { return await fn(...args); } catch (e) { if (e.status !== 401) flash(e.message, true); }
    };
  }

  // ---------------------------------------------------------------- who is signed in

  const isAdmin = () => Boolean(state.me && (state.me.operator || (state.me.user && state.me.user.is_admin)));
  const owns = (wsId) => isAdmin() || state.me.workspaces.some((w) => w.id === wsId && w.role === "owner");
  const ownsAny = () => isAdmin() || state.me.workspaces.some((w) => w.role === "owner");
  const ownedWorkspaces = () => state.workspaces.filter((w) => owns(w.id));

  function applyRole() {
    for (const e of document.querySelectorAll("[data-needs]")) {
      e.hidden = e.dataset.needs === "admin" ? !isAdmin() : !ownsAny();
    }
    const me = state.me;
    $("whoami").textContent = me.operator ? "admin token" : me.user.email + (me.user.is_admin ? " · admin" : "");
  }

  // ---------------------------------------------------------------- signing in

  async function enter(me) {
    const mine = ++epoch;
    try {
      const who = me || await api("GET", "/session", undefined, undefined, { quiet: true });
      if (mine !== epoch) return;
      state.me = who;
      state.csrf = who.csrf_token;
      const config = await api("GET", "/config");
      if (mine !== epoch) return;
      state.config = config;
      $("signin").hidden = true;
      $("app").hidden = false;
      applyRole();
      fillStaticOptions();
      await loadDirectory();
      if (mine !== epoch) return;
      route();
    } catch (e) {
      if (mine === epoch) throw e; // a stale entry's failure is no one's business
    }
  }

  function showForm(id) {
    for (const f of document.querySelectorAll("#signin form")) f.hidden = f.id !== id;
    $("signin").hidden = false;
    $("app").hidden = true;
  }

  function fail(id, e) {
    const err = $(id);
    err.textContent = e.message;
    err.hidden = false;
  }

  function signedOut(message) {
    epoch++;
    if (state.mode === "token") sessionStorage.removeItem(TOKEN);
    state.mode = null;
    state.me = state.csrf = null;
    state.newKey = null;
    $("new-key-value").textContent = "";
    $("new-key").hidden = true;
    $("token").value = "";
    $("login-password").value = "";
    const m = $("signin-message");
    m.textContent = message || "";
    m.hidden = !message;
    $("signin-error").hidden = $("login-error").hidden = true;
    showForm("login-form");
  }

  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("login-error").hidden = true;
    state.mode = "session";
    try {
      const me = await api("POST", "/session", { email: $("login-email").value.trim(),
        password: $("login-password").value });
      $("login-password").value = "";
      await enter(me);
    } catch (e) {
      fail("login-error", e);
    }
  });

  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    state.mode = "token";
    sessionStorage.setItem(TOKEN, $("token").value.trim());
    try {
      await enter();
    } catch (e) {
      sessionStorage.removeItem(TOKEN);
      fail("signin-error", e.status === 401 ? new Error("That token was not accepted.") : e);
    }
  });

  $("signup-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    state.mode = "session";
    try {
      await enter(await api("POST", "/signup", { email: $("signup-email").value.trim(),
        name: $("signup-name").value.trim(), password: $("signup-password").value }));
    } catch (e) {
      fail("signup-error", e);
    }
  });

  $("show-token").addEventListener("click", (ev) => { ev.preventDefault(); showForm("signin-form"); });
  $("show-signup").addEventListener("click", (ev) => { ev.preventDefault(); showForm("signup-form"); });
  for (const a of document.querySelectorAll(".show-login")) {
    a.addEventListener("click", (ev) => { ev.preventDefault(); showForm("login-form"); });
  }

  $("signout").addEventListener("click", async () => {
    if (state.mode === "session") await api("DELETE", "/session", undefined, undefined, { quiet: true }).catch(() => {});
    signedOut();
  });

  // An invitation link: /console/#invite=TOKEN (the token never reaches a
  // server log: browsers do not send the fragment).
  async function showInvite(token) {
    showForm("invite-form");
    let info;
    try {
      info = await api("POST", "/invitation/inspect", { token }, undefined, { quiet: true });
    } catch (e) {
      $("invite-info").textContent = "";
      fail("invite-error", e);
      $("invite-button").disabled = true;
      return;
    }
    const where = info.role === "admin" ? "as an admin" : `to workspace ${info.workspace} as ${info.role}`;
    $("invite-info").textContent = `${info.email} is invited ${where}.`;
    const existing = info.account === "existing";
    $("invite-name-label").hidden = existing;
    $("invite-password-label").textContent = existing ? "Your password (you already have an account)"
      : "Choose a password (10 characters or more)";
    $("invite-form").onsubmit = async (ev) => {
      ev.preventDefault();
      $("invite-error").hidden = true;
      state.mode = "session";
      try {
        const me = await api("POST", "/invitation/accept", { token, password: $("invite-password").value,
          name: $("invite-name").value.trim() }, undefined, { quiet: true });
        $("invite-password").value = "";
        history.replaceState(null, "", location.pathname + "#keys");
        await enter(me);
      } catch (e) {
        fail("invite-error", e);
      }
    };
  }

  // A session ended elsewhere (signed out, user disabled) shows here within
  // a few seconds, not only at the next click.
  setInterval(() => {
    if (state.mode === "session" && !$("app").hidden && document.visibilityState === "visible") {
      api("GET", "/session").catch(() => {});
    }
  }, 5000);

  // ---------------------------------------------------------------- navigation

  const VIEWS = ["dashboard", "keys", "requests", "members", "audit", "upstreams"];

  // #view or #view?workspace=ID: a view's URL may name the workspace it shows.
  function route() {
    const [name, query] = (location.hash || "#dashboard").slice(1).split("?");
    state.params = Object.fromEntries(new URLSearchParams(query || ""));
    let view = VIEWS.includes(name) ? name : "dashboard";
    if ((view === "upstreams" && !isAdmin()) || ((view === "members" || view === "audit") && !ownsAny())) {
      view = "dashboard";
    }
    show(view);
  }
  window.addEventListener("hashchange", () => {
    if (location.hash.startsWith("#invite=")) showInvite(location.hash.slice("#invite=".length));
    else if (!$("app").hidden) route();
  });

  function show(view) {
    state.view = view;
    for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== "view-" + view;
    for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.view === view);
    // data-ready tells a watcher (and the browser tests) the view has rendered.
    const section = $("view-" + view);
    section.dataset.ready = "0";
    const load = { dashboard: loadDashboard, keys: loadKeys, requests: () => loadLog(null),
      members: loadMembers, audit: () => loadAudit(null), upstreams: loadUpstreams }[view];
    Promise.resolve(load()).finally(() => { if (state.view === view) section.dataset.ready = "1"; });
  }

  function fillStaticOptions() {
    const models = state.config.models;
    for (const id of ["dash-model", "log-model"]) {
      const s = $(id);
      s.replaceChildren(el("option", { value: "" }, id === "dash-model" ? "All models" : "All"),
        ...models.map((m) => el("option", { value: m }, m)));
    }
    for (const s of document.querySelectorAll("select.groups")) {
      const keep = s.id === "key-group" ? [el("option", { value: "" }, "(workspace default)")] : [];
      s.replaceChildren(...keep, ...state.config.groups.map((g) => el("option", { value: g.name },
        `${g.name} (×${g.ratio})`)));
    }
    $("ws-group").value = "default";
  }

  async function loadDirectory() {
    const mine = epoch;
    const [ws, keys] = await Promise.all([api("GET", "/workspaces"), api("GET", "/keys")]);
    if (mine !== epoch) return; // signed out (or in as someone else) meanwhile
    state.workspaces = ws.data;
    state.keys = keys.data;
    const wsOptions = (list) => list.map((w) => el("option", { value: w.id }, w.name));
    const prev = { ws: $("log-ws").value, key: $("log-key").value, kws: $("key-ws").value,
      mws: $("members-ws").value, aws: $("audit-ws").value };
    $("key-ws").replaceChildren(...wsOptions(state.workspaces));
    $("log-ws").replaceChildren(el("option", { value: "" }, "All"), ...wsOptions(state.workspaces));
    $("members-ws").replaceChildren(...wsOptions(ownedWorkspaces()));
    $("audit-ws").replaceChildren(el("option", { value: "" }, "All"), ...wsOptions(ownedWorkspaces()));
    $("log-key").replaceChildren(el("option", { value: "" }, "All"),
      ...state.keys.map((k) => el("option", { value: k.id }, `${k.prefix}… ${k.name || ""} (${k.workspace})`)));
    if (prev.ws) $("log-ws").value = prev.ws;
    if (prev.key) $("log-key").value = prev.key;
    if (prev.kws) $("key-ws").value = prev.kws;
    if (prev.mws) $("members-ws").value = prev.mws;
    if (prev.aws) $("audit-ws").value = prev.aws;
  }

  // The workspace a view's URL names (#keys?workspace=3), checked by the
  // server: another workspace's id gets the same 404 as one that does not exist.
  function urlWorkspace() {
    const id = state.params.workspace;
    return id === undefined || id === "" ? null : Number(id);
  }

  function showError(id, message) {
    const e = $(id);
    e.textContent = message || "";
    e.hidden = !message;
  }

  // ---------------------------------------------------------------- dashboard

  function dashRange() {
    const r = $("dash-range").value;
    const now = Date.now() / 1000;
    if (r === "custom") {
      const since = fromLocal($("dash-from").value) || now - 86400;
      const until = fromLocal($("dash-to").value) || now;
      return { since, until };
    }
    return { since: now - Number(r), until: now };
  }

  // Minute buckets are kept for all workspaces together: an admin's view.
  function bucketFor(span) {
    if (span <= 6 * 3600 && isAdmin()) return ["minute", 60];
    if (span <= 6 * 3600) return ["hour", 3600];
    if (span <= 8 * 86400) return ["hour", 3600];
    return ["day", 86400];
  }

  const loadDashboard = guard(async function () {
    const { since, until } = dashRange();
    const [bucket, step] = bucketFor(until - since);
    $("dash-bucket").textContent = `${bucket} buckets`;
    const model = $("dash-model").value;
    const params = { since, until, bucket, by: "model", model };
    const [series, totals] = await Promise.all([
      api("GET", "/usage", undefined, params),
      api("GET", "/usage", undefined, { since, until, bucket: "total", model }),
    ]);
    renderTotals(totals.data[0]);
    const start = Math.floor(since / step) * step;
    const xs = [];
    for (let t = start; t < until; t += step) xs.push(t);
    const byModel = new Map();
    for (const row of series.data) {
      const name = row.model || "(none)";
      if (!byModel.has(name)) byModel.set(name, new Map());
      byModel.get(name).set(row.t, row);
    }
    const names = [...byModel.keys()].sort();
    const pick = (field, zero) => names.map((n) => xs.map((t) => {
      const r = byModel.get(n).get(t);
      return r ? r[field] : (zero ? 0 : null);
    }));
    drawChart("requests", xs, names, pick("requests", true), (v) => num(v));
    drawChart("tokens", xs, names, pick("tokens", true), (v) => num(v));
    drawChart("cost", xs, names, pick("cost", true), money);
    drawChart("errors", xs, names, pick("errors", true), (v) => num(v));
    const dual = (a, b) => {
      const labels = [], values = [];
      names.forEach((n, i) => {
        labels.push(`${n} p50`, `${n} p95`);
        values.push(a[i], b[i]);
      });
      return [labels, values];
    };
    const [latL, latV] = dual(pick("p50_latency_ms"), pick("p95_latency_ms"));
    drawChart("latency", xs, latL, latV, (v) => num(v, 1), true);
    const [tL, tV] = dual(pick("p50_ttfb_ms"), pick("p95_ttfb_ms"));
    drawChart("ttfb", xs, tL, tV, (v) => num(v, 1), true);
  });

  function renderTotals(t) {
    t = t || { requests: 0, errors: 0, tokens: 0, cost: 0, p50_latency_ms: null, p95_latency_ms: null };
    const card = (label, value, id) => el("div", { id }, el("span", { class: "muted" }, label), el("b", {}, value));
    $("dash-totals").replaceChildren(
      card("Requests", num(t.requests), "total-requests"),
      card("Errors", num(t.errors), "total-errors"),
      card("Tokens", num(t.tokens), "total-tokens"),
      card("Cost", money(t.cost), "total-cost"),
      card("p50 latency", t.p50_latency_ms === null ? "–" : num(t.p50_latency_ms, 1) + " ms", "total-p50"),
      card("p95 latency", t.p95_latency_ms === null ? "–" : num(t.p95_latency_ms, 1) + " ms", "total-p95"),
      card("p95 TTFB", t.p95_ttfb_ms === null || t.p95_ttfb_ms === undefined ? "–" : num(t.p95_ttfb_ms, 1) + " ms",
        "total-ttfb"),
    );
  }

  function axisLabel(v, isMoney) {
    const a = Math.abs(v);
    const s = a >= 1e6 ? +(v / 1e6).toPrecision(3) + "M" : a >= 1e3 ? +(v / 1e3).toPrecision(3) + "k"
      : String(+v.toPrecision(3));
    return isMoney ? "$" + s : s;
  }

  function drawChart(name, xs, labels, values, fmt, percentiles) {
    const box = $("chart-" + name);
    if (state.charts[name]) { state.charts[name].destroy(); delete state.charts[name]; }
    const title = el("h3", {}, box.dataset.title);
    if (!labels.length) {
      box.replaceChildren(title, el("div", { class: "empty" }, "No requests in this range."));
      return;
    }
    const plot = el("div", { class: "plot" });
    // Per-series totals under the chart (and a hook for tests: data-series).
    const sums = el("div", { class: "sums" }, ...labels.map((l, i) => {
      const vals = values[i].filter((v) => v !== null);
      const agg = percentiles ? (vals.length ? Math.max(...vals) : null) : vals.reduce((a, b) => a + b, 0);
      return el("span", { "data-series": l, "data-value": agg === null ? "" : agg },
        `${l}: ${agg === null ? "–" : fmt(agg)}${percentiles ? " max" : ""}`);
    }));
    box.replaceChildren(title, plot, sums);
    const series = [{}].concat(labels.map((l, i) => ({
      label: l,
      stroke: COLORS[(percentiles ? Math.floor(i / 2) : i) % COLORS.length],
      dash: percentiles && i % 2 === 0 ? [4, 4] : undefined,
      width: 1.5,
      points: { show: xs.length < 100 },
      spanGaps: false,
      value: (u, v) => (v === null || v === undefined ? "–" : fmt(v)),
    })));
    const opts = {
      width: Math.max(300, box.clientWidth - 20),
      height: 200,
      series,
      scales: { x: { time: true } },
      axes: [{}, { size: 70, values: (u, ticks) => ticks.map((v) => axisLabel(v, fmt === money)) }],
      legend: { live: true },
    };
    state.charts[name] = new uPlot(opts, [xs, ...values], plot);
  }

  $("dash-range").addEventListener("change", () => {
    const custom = $("dash-range").value === "custom";
    $("dash-custom").hidden = !custom;
    if (custom && !$("dash-from").value) {
      const now = Date.now() / 1000;
      $("dash-from").value = toLocal(now - 86400);
      $("dash-to").value = toLocal(now);
    }
    loadDashboard();
  });
  for (const id of ["dash-model", "dash-from", "dash-to"]) $(id).addEventListener("change", () => loadDashboard());
  $("dash-refresh").addEventListener("click", () => loadDashboard());
  window.addEventListener("resize", () => {
    for (const [name, chart] of Object.entries(state.charts)) {
      chart.setSize({ width: Math.max(300, $("chart-" + name).clientWidth - 20), height: 200 });
    }
  });

  // ---------------------------------------------------------------- workspaces and keys

  const loadKeys = guard(async function () {
    await loadDirectory();
    const wsId = urlWorkspace();
    showError("keys-error", "");
    let keys = state.keys;
    if (wsId !== null) {
      try {
        keys = (await api("GET", "/keys", undefined, { workspace_id: wsId })).data;
        $("key-ws").value = wsId;
      } catch (e) {
        keys = [];
        showError("keys-error", e.status === 404 ? `Workspace ${wsId} does not exist or is not yours.` : e.message);
      }
    }
    const workspaces = wsId === null ? state.workspaces : state.workspaces.filter((w) => w.id === wsId);
    $("ws-table").tBodies[0].replaceChildren(...workspaces.map((w) => el("tr", { "data-id": w.id },
      td(w.id), td(w.name), td(w.role), td(w.default_group), td(w.models.join(", "), "wrap"),
      td(w.monthly_spend_limit === null ? "none" : money(w.monthly_spend_limit)),
      td(w.monthly_token_limit === null ? "none" : num(w.monthly_token_limit)),
      el("td", {},
        el("a", { href: `#keys?workspace=${w.id}`, class: "ws-link" }, "Keys"),
        owns(w.id) ? el("a", { href: `#members?workspace=${w.id}`, class: "ws-link" }, "Members") : null,
        isAdmin() ? el("button", { class: "link", onclick: () => editWorkspace(w) }, "Edit") : null),
    )));
    $("key-table").tBodies[0].replaceChildren(...keys.map((k) => {
      const limits = [["rpm", k.rpm], ["tpm", k.tpm], ["conc", k.max_concurrency],
        ["spend", k.spend_limit === null ? null : money(k.spend_limit)],
        ["expires", k.expires_at ? when(k.expires_at) : null]]
        .filter(([, v]) => v !== null).map(([n, v]) => `${n} ${v}`).join(", ");
      const actions = el("td", {});
      if (k.status === "active" || k.status === "suspended") {
        actions.append(
          el("button", { class: "link", onclick: () => editKey(k) }, "Edit"),
          el("button", { class: "danger revoke", "data-key": k.id, onclick: () => revokeKey(k) }, "Revoke"));
      }
      return el("tr", { "data-key": k.id },
        td(k.id), el("td", {}, el("code", {}, k.prefix + "…")), td(k.name), td(k.workspace),
        td(k.user_email || "(admin)"),
        td(k.group_name || "(default)"), td(k.allowed_models ? k.allowed_models.join(", ") : "all"),
        td(limits || "none"),
        td(k.status, k.status === "active" ? "status-ok" : "status-bad"),
        td(when(k.last_used)), td(num(k.usage.requests), "num"),
        td(num(k.usage.input_tokens + k.usage.output_tokens), "num"), td(money(k.usage.cost), "num"), actions);
    }));
    renderExamples();
  });

  // ---------------------------------------------------------------- examples

  // Copyable examples for the common clients, with this gateway's base URL,
  // a model the selected workspace may use, and the new key while it is shown.
  const EXAMPLES = {
    curl: (b, key, m) => `curl ${b.v1}/chat/completions \\
  -H "Authorization: Bearer ${key}" \\
  -H "Content-Type: application/json" \\
  -d '{"model": "${m.any}", "messages": [{"role": "user", "content": "Hello"}]}'`,
    "OpenAI SDK": (b, key, m) => `from openai import OpenAI

client = OpenAI(base_url="${b.v1}", api_key="${key}")
reply = client.chat.completions.create(
    model="${m.openai}", messages=[{"role": "user", "content": "Hello"}])
print(reply.choices[0].message.content)`,
    "Anthropic SDK": (b, key, m) => `import anthropic

# The Anthropic SDK adds /v1 itself.
client = anthropic.Anthropic(base_url="${b.origin}", api_key="${key}")
reply = client.messages.create(
    model="${m.claude}", max_tokens=1024, messages=[{"role": "user", "content": "Hello"}])
print(reply.content[0].text)`,
    "Claude Code": (b, key, m) => `export ANTHROPIC_BASE_URL="${b.origin}"
export ANTHROPIC_AUTH_TOKEN="${key}"
export ANTHROPIC_MODEL="${m.claude}"
claude`,
    Codex: (b, key, m) => `# ~/.codex/config.toml
model = "${m.openai}"
model_provider = "gateway"

[model_providers.gateway]
name = "gateway"
base_url = "${b.v1}"
env_key = "GATEWAY_API_KEY"
wire_api = "responses"

# then, in the shell:
export GATEWAY_API_KEY="${key}"
codex`,
  };

  function renderExamples() {
    const v1 = state.me.base_url;
    const origin = v1.replace(/\/v1$/, "");
    const ws = state.workspaces.find((w) => String(w.id) === $("key-ws").value) || state.workspaces[0];
    const models = ws ? ws.models : state.config.models;
    const like = (re) => models.find((n) => re.test(n)) || models[0] || "MODEL";
    const m = { any: models[0] || "MODEL", openai: like(/gpt|^o\d/i), claude: like(/claude/i) };
    const key = state.newKey || (state.example === "Codex" ? "gw-..." : "$GATEWAY_API_KEY");
    $("base-url").textContent = v1;
    $("example-tabs").replaceChildren(...Object.keys(EXAMPLES).map((name) => el("button", {
      class: name === state.example ? "tab active" : "tab", "data-example": name,
      onclick: () => { state.example = name; renderExamples(); } }, name)));
    $("example-code").textContent = EXAMPLES[state.example]({ v1, origin }, key, m);
  }
  $("key-ws").addEventListener("change", () => renderExamples());
  $("example-copy").addEventListener("click", () => copyText($("example-code"), $("example-copy")));

  async function copyText(node, button) {
    try {
      await navigator.clipboard.writeText(node.textContent);
    } catch (e) {
      // Clipboard API needs a secure context; fall back to selecting the text.
      const range = document.createRange();
      range.selectNodeContents(node);
      const sel = getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      document.execCommand("copy");
    }
    button.textContent = "Copied";
  }

  const optNum = (id) => ($(id).value === "" ? null : Number($(id).value));

  $("ws-form").addEventListener("submit", guard(async (ev) => {
    ev.preventDefault();
    const ws = await api("POST", "/workspaces", {
      name: $("ws-name").value.trim(), default_group: $("ws-group").value,
      monthly_spend_limit: optNum("ws-spend"), monthly_token_limit: optNum("ws-tokens"),
    });
    $("ws-form").reset();
    $("ws-group").value = "default";
    flash(`Workspace ${ws.name} created.`);
    await loadKeys();
    $("key-ws").value = ws.id;
  }));

  async function editWorkspace(w) {
    const group = prompt(`Default group for ${w.name}:`, w.default_group);
    if (group === null) return;
    const spend = prompt("Monthly spend limit in USD (empty: none):", w.monthly_spend_limit ?? "");
    if (spend === null) return;
    const tokens = prompt("Monthly token limit (empty: none):", w.monthly_token_limit ?? "");
    if (tokens === null) return;
    if (Number.isNaN(Number(spend)) || Number.isNaN(Number(tokens))) { flash("Limits must be numbers.", true); return; }
    await guard(async () => {
      await api("PATCH", `/workspaces/${w.id}`, {
        default_group: group.trim(), monthly_spend_limit: spend.trim() === "" ? null : Number(spend),
        monthly_token_limit: tokens.trim() === "" ? null : Number(tokens),
      });
      flash(`Workspace ${w.name} updated.`);
      await loadKeys();
    })();
  }

  $("key-form").addEventListener("submit", guard(async (ev) => {
    ev.preventDefault();
    const models = $("key-models").value.split(",").map((s) => s.trim()).filter(Boolean);
    const expires = fromLocal($("key-expires").value);
    const res = await api("POST", "/keys", {
      workspace_id: Number($("key-ws").value), name: $("key-name").value.trim(),
      group_name: isAdmin() ? ($("key-group").value || null) : undefined, allowed_models: models.length ? models : null,
      rpm: optNum("key-rpm"), tpm: optNum("key-tpm"), max_concurrency: optNum("key-conc"),
      spend_limit: optNum("key-spend"), expires_at: expires,
    });
    const ws = $("key-ws").value;
    $("key-form").reset();
    state.newKey = res.plaintext;
    $("key-ws").value = ws;
    renderExamples();
    $("new-key-value").textContent = res.plaintext;
    $("new-key").hidden = false;
    $("new-key-copy").textContent = "Copy";
    $("key-ws").value = ws;
    await loadKeys();
    $("key-ws").value = ws;
    renderExamples();
  }));

  $("new-key-copy").addEventListener("click", () => copyText($("new-key-value"), $("new-key-copy")));
  $("new-key-done").addEventListener("click", () => {
    state.newKey = null;
    $("new-key-value").textContent = "";
    $("new-key").hidden = true;
    renderExamples();
  });

  async function editKey(k) {
    const fields = {};
    const name = prompt("Name:", k.name);
    if (name === null) return;
    fields.name = name.trim();
    const ask = (label, name, current) => {
      const v = prompt(`${label} (empty: none):`, current ?? "");
      if (v === null) return false;
      const n = v.trim() === "" ? null : Number(v);
      if (Number.isNaN(n)) { flash(`${label}: not a number`, true); return false; }
      fields[name] = n;
      return true;
    };
    if (!ask("Requests per minute", "rpm", k.rpm) || !ask("Tokens per minute", "tpm", k.tpm) ||
        !ask("Max concurrent requests", "max_concurrency", k.max_concurrency) ||
        !ask("Spend limit USD", "spend_limit", k.spend_limit)) return;
    const models = prompt("Allowed models, comma-separated (empty: all):", (k.allowed_models || []).join(", "));
    if (models === null) return;
    const list = models.split(",").map((s) => s.trim()).filter(Boolean);
    fields.allowed_models = list.length ? list : null;
    await guard(async () => {
      await api("PATCH", `/keys/${k.id}`, fields);
      flash(`Key ${k.prefix}… updated.`);
      await loadKeys();
    })();
  }

  async function revokeKey(k) {
    if (!confirm(`Revoke key ${k.prefix}… (${k.name || "unnamed"})? Clients using it will get 401 at once.`)) return;
    await guard(async () => {
      await api("DELETE", `/keys/${k.id}`);
      flash(`Key ${k.prefix}… revoked.`);
      await loadKeys();
    })();
  }

  // ---------------------------------------------------------------- request log

  function logParams() {
    return {
      since: fromLocal($("log-from").value), until: fromLocal($("log-to").value),
      workspace_id: urlWorkspace() ?? $("log-ws").value, key_id: $("log-key").value, model: $("log-model").value,
      status: $("log-status").value, limit: 50,
    };
  }

  // stack holds the cursors of the pages before the current one.
  const loadLog = guard(async function (cursor) {
    if (cursor === null) { state.log.stack = []; await loadDirectory(); }
    showError("log-error", "");
    let page;
    try {
      page = await api("GET", "/requests", undefined, { ...logParams(), cursor: cursor || "" });
    } catch (e) {
      if (e.status !== 404) throw e;
      page = { items: [], next_cursor: null };
      showError("log-error", `Workspace ${urlWorkspace()} does not exist or is not yours.`);
    }
    state.log.cursor = cursor;
    state.log.next = page.next_cursor;
    $("log-table").tBodies[0].replaceChildren(...page.items.map((r) => el("tr", { "data-request": r.request_id },
      td(when(r.ts)), el("td", {}, el("code", {}, r.request_id)), td(r.workspace),
      td(r.key_prefix ? `${r.key_prefix}… ${r.key_name || ""}` : ""), td(r.endpoint), td(r.model), td(r.upstream),
      td(r.status, r.status < 400 ? "status-ok" : r.status < 500 ? "status-warn" : "status-bad"),
      td(r.stream ? "yes" : ""), td(num(r.input_tokens), "num"), td(num(r.output_tokens), "num"),
      td(money(r.cost), "num"), td(num(r.latency_ms, 1), "num"), td(num(r.ttfb_ms, 1), "num"), td(r.error_type),
    )));
    if (!page.items.length) {
      $("log-table").tBodies[0].replaceChildren(el("tr", {}, el("td", { colspan: 15, class: "muted" },
        "No requests match.")));
    }
    $("log-newer").disabled = state.log.stack.length === 0;
    $("log-older").disabled = !page.next_cursor;
    $("log-page").textContent = `page ${state.log.stack.length + 1}`;
  });

  $("log-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadLog(null); });
  $("log-older").addEventListener("click", () => {
    state.log.stack.push(state.log.cursor);
    loadLog(state.log.next);
  });
  $("log-newer").addEventListener("click", () => {
    const prev = state.log.stack.pop();
    loadLog(prev === undefined ? null : prev);
  });

  // ---------------------------------------------------------------- upstreams

  const loadUpstreams = guard(async function () {
    const res = await api("GET", "/upstreams");
    $("up-table").tBodies[0].replaceChildren(...res.data.map((u) => {
      const c = u.circuit || "n/a";
      const r = u.recent;
      return el("tr", { "data-upstream": u.name },
        td(u.name), td(u.kind), el("td", {}, el("code", {}, u.base_url)),
        td(c, c === "closed" ? "status-ok" : c === "open" ? "status-bad" : c === "half_open" ? "status-warn" : ""),
        td(u.credential_configured ? "set" : "none"), td(num(r.requests), "num"),
        td((r.error_rate * 100).toFixed(1) + " %", r.error_rate > 0.05 ? "status-bad num" : "num"),
        td(num(r.p50_latency_ms, 1), "num"), td(num(r.p95_latency_ms, 1), "num"), td(num(r.p95_ttfb_ms, 1), "num"),
        td(u.models.join(", ")));
    }));
    $("reload-config").disabled = !state.config.reload_available;
    $("reload-config").title = state.config.reload_available ? "" : "Config reload is not available in this build";
  });
  $("up-refresh").addEventListener("click", () => loadUpstreams());
  $("reload-config").addEventListener("click", guard(async () => {
    if (!confirm("Reload the configuration file now?")) return;
    await api("POST", "/reload");
    flash("Configuration reloaded.");
    state.config = await api("GET", "/config");
    fillStaticOptions();
    await loadUpstreams();
  }));

  // ---------------------------------------------------------------- members and invitations

  function membersWorkspace() {
    const wsId = urlWorkspace();
    if (wsId !== null) return wsId;
    return $("members-ws").value === "" ? null : Number($("members-ws").value);
  }

  const loadMembers = guard(async function () {
    await loadDirectory();
    const wsId = membersWorkspace();
    showError("members-error", "");
    const tables = ["members-table", "invites-table", "users-table"];
    for (const t of tables) $(t).tBodies[0].replaceChildren();
    if (wsId === null) { showError("members-error", "You own no workspace."); return; }
    $("members-ws").value = wsId;
    let members, invites;
    try {
      [members, invites] = await Promise.all([api("GET", `/workspaces/${wsId}/members`),
        api("GET", "/invitations", undefined, { workspace_id: wsId })]);
    } catch (e) {
      showError("members-error", e.status === 404 ? `Workspace ${wsId} does not exist or is not yours.` : e.message);
      return;
    }
    const myId = state.me.user ? state.me.user.id : null;
    $("members-table").tBodies[0].replaceChildren(...members.data.map((u) => {
      const role = el("select", { "data-member": u.id, onchange: (ev) => setRole(wsId, u, ev.target.value) },
        ...["member", "owner"].map((r) => el("option", { value: r, selected: r === u.role }, r)));
      return el("tr", { "data-user": u.id },
        td(u.id), td(u.email), td(u.name), el("td", {}, role), td(u.status, u.status === "active" ? "status-ok"
          : "status-bad"), td(when(u.last_login_at)),
        el("td", {}, u.id === myId ? null : el("button", { class: "danger remove-member", "data-user": u.id,
          onclick: () => removeMember(wsId, u) }, "Remove")));
    }));
    $("invites-table").tBodies[0].replaceChildren(...invites.data.map((i) => el("tr", { "data-invite": i.id },
      td(i.id), td(i.email), td(i.workspace), td(i.role), td(i.invited_by_email || "(admin)"), td(when(i.expires_at)),
      el("td", {}, el("button", { class: "danger", onclick: () => revokeInvite(i) }, "Revoke")))));
    if (isAdmin()) await loadUsers();
  });
  $("members-ws").addEventListener("change", () => { location.hash = `#members?workspace=${$("members-ws").value}`; });

  async function loadUsers() {
    const res = await api("GET", "/users");
    const myId = state.me.user ? state.me.user.id : null;
    $("users-table").tBodies[0].replaceChildren(...res.data.map((u) => el("tr", { "data-user": u.id },
      td(u.id), td(u.email), td(u.name), td(u.is_admin ? "yes" : ""),
      td(u.status, u.status === "active" ? "status-ok" : "status-bad"),
      td(u.workspaces.map((w) => `${w.workspace} (${w.role})`).join(", ")), td(when(u.last_login_at)),
      el("td", {}, u.id === myId ? null : el("button", {
        class: u.status === "disabled" ? "link enable-user" : "danger disable-user", "data-user": u.id,
        onclick: () => setDisabled(u, u.status !== "disabled") }, u.status === "disabled" ? "Enable" : "Disable")))));
  }

  const setRole = guard(async (wsId, u, role) => {
    await api("PATCH", `/workspaces/${wsId}/members/${u.id}`, { role });
    flash(`${u.email} is now ${role}.`);
    await loadMembers();
  });

  async function removeMember(wsId, u) {
    if (!confirm(`Remove ${u.email} from this workspace? The keys they made here are revoked.`)) return;
    await guard(async () => {
      const res = await api("DELETE", `/workspaces/${wsId}/members/${u.id}`);
      flash(`${u.email} removed; ${res.revoked_keys.length} key(s) revoked.`);
      await loadMembers();
    })();
  }

  async function setDisabled(u, disabled) {
    if (disabled && !confirm(`Disable ${u.email}? They are signed out at once and their keys stop working.`)) return;
    await guard(async () => {
      await api("PATCH", `/users/${u.id}`, { disabled });
      flash(`${u.email} ${disabled ? "disabled" : "enabled"}.`);
      await loadMembers();
    })();
  }

  async function revokeInvite(i) {
    if (!confirm(`Revoke the invitation for ${i.email}?`)) return;
    await guard(async () => {
      await api("DELETE", `/invitations/${i.id}`);
      await loadMembers();
    })();
  }

  $("invite-create").addEventListener("submit", guard(async (ev) => {
    ev.preventDefault();
    const role = $("invite-role").value;
    const res = await api("POST", "/invitations", { email: $("invite-email").value.trim(), role,
      workspace_id: role === "admin" ? null : membersWorkspace() });
    $("invite-create").reset();
    $("invite-link-value").textContent = res.link;
    $("invite-link").hidden = false;
    $("invite-link-copy").textContent = "Copy";
    await loadMembers();
  }));
  $("invite-link-copy").addEventListener("click", () => copyText($("invite-link-value"), $("invite-link-copy")));
  $("invite-link-done").addEventListener("click", () => {
    $("invite-link-value").textContent = "";
    $("invite-link").hidden = true;
  });

  // ---------------------------------------------------------------- audit log

  function change(before, after) {
    before = before || {};
    after = after || {};
    const show = (v, k) => (v === null || v === undefined ? "–" : typeof v === "object" ? JSON.stringify(v)
      : k.endsWith("_at") && typeof v === "number" ? when(v) : String(v));
    const keys = [...new Set([...Object.keys(before), ...Object.keys(after)])]
      .filter((k) => JSON.stringify(before[k]) !== JSON.stringify(after[k]))
      .filter((k) => k in before || (after[k] !== null && after[k] !== false));  // a new object: what it has
    return keys.map((k) => (k in before && k in after ? `${k}: ${show(before[k], k)} → ${show(after[k], k)}`
      : k in after ? `${k}: ${show(after[k], k)}` : `${k}: ${show(before[k], k)} (removed)`)).join("; ");
  }

  const loadAudit = guard(async function (cursor) {
    if (cursor === null) await loadDirectory();
    const res = await api("GET", "/audit", undefined, { action: $("audit-action").value,
      actor: $("audit-actor").value.trim(), workspace_id: $("audit-ws").value, limit: 50, cursor: cursor || "" });
    const rows = res.items.map((a) => el("tr", { "data-audit": a.id },
      td(when(a.ts)), td(a.actor), td(a.address), td(a.action),
      td(a.target_type ? `${a.target_type} ${a.target_id}` : ""), td(a.workspace),
      td(change(a.before, a.after), "wrap change")));
    if (cursor === null) $("audit-table").tBodies[0].replaceChildren(...rows);
    else $("audit-table").tBodies[0].append(...rows);
    state.audit.cursor = res.next_cursor;
    $("audit-older").disabled = !res.next_cursor;
  });
  $("audit-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadAudit(null); });
  $("audit-older").addEventListener("click", () => loadAudit(state.audit.cursor));

  // ---------------------------------------------------------------- start

  async function start() {
    const options = await api("GET", "/signin-options", undefined, undefined, { quiet: true })
      .catch(() => ({ open_signup: false, admin_token: true }));
    $("signup-link").hidden = !options.open_signup;
    $("show-token").hidden = !options.admin_token;
    if (location.hash.startsWith("#invite=")) {
      await showInvite(location.hash.slice("#invite=".length));
      return;
    }
    if (sessionStorage.getItem(TOKEN)) {
      state.mode = "token";
      try { await enter(); return; } catch (e) { sessionStorage.removeItem(TOKEN); }
    }
    state.mode = "session";
    try {
      await enter();
    } catch (e) {
      signedOut();
      if (options.token_first) showForm("signin-form");
    }
  }
  start();
})();
