// Gateway console: a single page on the admin API. No build step, no
// external requests: uPlot is vendored next to this file. The admin token
// lives in sessionStorage (this tab only) and travels only in the
// Authorization header, never in a URL.
(function () {
  "use strict";

  const API = "/admin/api";
  const TOKEN = "gateway.adminToken";
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563",
    "#65a30d", "#9333ea"];
  const $ = (id) => document.getElementById(id);
  const state = { view: null, config: null, workspaces: [], keys: [], charts: {}, log: { stack: [], cursor: null } };
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

  async function api(method, path, body, params) {
    const url = new URL(API + path, location.origin);
    for (const [k, v] of Object.entries(params || {})) {
      if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, v);
    }
    const headers = { Authorization: "Bearer " + sessionStorage.getItem(TOKEN) };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await r.json().catch(() => ({}));
    if (r.status === 401 && path !== "/config") { signOut("Your session ended: sign in again."); }
    if (!r.ok) throw new ApiError(r.status, (data.error && data.error.message) || r.statusText);
    return data;
  }

  function guard(fn) {
    return async (...args) => {
      try { return await fn(...args); } catch (e) { flash(e.message, true); }
    };
  }

  // ---------------------------------------------------------------- sign in

  async function signIn(token) {
    sessionStorage.setItem(TOKEN, token);
    try {
      state.config = await api("GET", "/config");
    } catch (e) {
      sessionStorage.removeItem(TOKEN);
      throw e;
    }
    $("signin").hidden = true;
    $("app").hidden = false;
    fillStaticOptions();
    await loadDirectory();
    route();
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN);
    $("app").hidden = true;
    $("signin").hidden = false;
    $("token").value = "";
    const err = $("signin-error");
    err.textContent = message || "";
    err.hidden = !message;
  }

  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await signIn($("token").value.trim());
    } catch (e) {
      const err = $("signin-error");
      err.textContent = e.status === 401 ? "That token was not accepted." : e.message;
      err.hidden = false;
    }
  });
  $("signout").addEventListener("click", () => signOut());

  // ---------------------------------------------------------------- navigation

  function route() {
    const view = (location.hash || "#dashboard").slice(1);
    show(["dashboard", "keys", "requests", "upstreams"].includes(view) ? view : "dashboard");
  }
  window.addEventListener("hashchange", () => { if (!$("app").hidden) route(); });

  function show(view) {
    state.view = view;
    for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== "view-" + view;
    for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.view === view);
    // data-ready tells a watcher (and the browser tests) the view has rendered.
    const section = $("view-" + view);
    section.dataset.ready = "0";
    const load = { dashboard: loadDashboard, keys: loadKeys, requests: () => loadLog(null),
      upstreams: loadUpstreams }[view];
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
    const [ws, keys] = await Promise.all([api("GET", "/workspaces"), api("GET", "/keys")]);
    state.workspaces = ws.data;
    state.keys = keys.data;
    const wsOptions = () => state.workspaces.map((w) => el("option", { value: w.id }, w.name));
    const prev = { ws: $("log-ws").value, key: $("log-key").value, kws: $("key-ws").value };
    $("key-ws").replaceChildren(...wsOptions());
    $("log-ws").replaceChildren(el("option", { value: "" }, "All"), ...wsOptions());
    $("log-key").replaceChildren(el("option", { value: "" }, "All"),
      ...state.keys.map((k) => el("option", { value: k.id }, `${k.prefix}… ${k.name || ""} (${k.workspace})`)));
    if (prev.ws) $("log-ws").value = prev.ws;
    if (prev.key) $("log-key").value = prev.key;
    if (prev.kws) $("key-ws").value = prev.kws;
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

  function bucketFor(span) {
    if (span <= 6 * 3600) return ["minute", 60];
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
    $("ws-table").tBodies[0].replaceChildren(...state.workspaces.map((w) => el("tr", { "data-id": w.id },
      td(w.id), td(w.name), td(w.default_group),
      td(w.monthly_spend_limit === null ? "none" : money(w.monthly_spend_limit)),
      td(w.monthly_token_limit === null ? "none" : num(w.monthly_token_limit)),
      el("td", {}, el("button", { class: "link", onclick: () => editWorkspace(w) }, "Edit")),
    )));
    $("key-table").tBodies[0].replaceChildren(...state.keys.map((k) => {
      const limits = [["rpm", k.rpm], ["tpm", k.tpm], ["conc", k.max_concurrency],
        ["spend", k.spend_limit === null ? null : money(k.spend_limit)],
        ["expires", k.expires_at ? when(k.expires_at) : null]]
        .filter(([, v]) => v !== null).map(([n, v]) => `${n} ${v}`).join(", ");
      const actions = el("td", {});
      if (k.status === "active") {
        actions.append(
          el("button", { class: "link", onclick: () => editKey(k) }, "Edit"),
          el("button", { class: "danger revoke", "data-key": k.id, onclick: () => revokeKey(k) }, "Revoke"));
      }
      return el("tr", { "data-key": k.id },
        td(k.id), el("td", {}, el("code", {}, k.prefix + "…")), td(k.name), td(k.workspace),
        td(k.group_name || "(default)"), td(k.allowed_models ? k.allowed_models.join(", ") : "all"),
        td(limits || "none"),
        td(k.status, k.status === "active" ? "status-ok" : "status-bad"),
        td(when(k.last_used)), td(num(k.usage.requests), "num"),
        td(num(k.usage.input_tokens + k.usage.output_tokens), "num"), td(money(k.usage.cost), "num"), actions);
    }));
  });

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
      group_name: $("key-group").value || null, allowed_models: models.length ? models : null,
      rpm: optNum("key-rpm"), tpm: optNum("key-tpm"), max_concurrency: optNum("key-conc"),
      spend_limit: optNum("key-spend"), expires_at: expires,
    });
    const ws = $("key-ws").value;
    $("key-form").reset();
    $("new-key-value").textContent = res.plaintext;
    $("new-key").hidden = false;
    $("new-key-copy").textContent = "Copy";
    await loadKeys();
    $("key-ws").value = ws;
  }));

  $("new-key-copy").addEventListener("click", async () => {
    const text = $("new-key-value").textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch (e) {
      // Clipboard API needs a secure context; fall back to selecting the text.
      const range = document.createRange();
      range.selectNodeContents($("new-key-value"));
      const sel = getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      document.execCommand("copy");
    }
    $("new-key-copy").textContent = "Copied";
  });
  $("new-key-done").addEventListener("click", () => {
    $("new-key-value").textContent = "";
    $("new-key").hidden = true;
  });

  async function editKey(k) {
    const fields = {};
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
      workspace_id: $("log-ws").value, key_id: $("log-key").value, model: $("log-model").value,
      status: $("log-status").value, limit: 50,
    };
  }

  // stack holds the cursors of the pages before the current one.
  const loadLog = guard(async function (cursor) {
    if (cursor === null) { state.log.stack = []; await loadDirectory(); }
    const page = await api("GET", "/requests", undefined, { ...logParams(), cursor: cursor || "" });
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

  // ---------------------------------------------------------------- start

  const saved = sessionStorage.getItem(TOKEN);
  if (saved) {
    signIn(saved).catch(() => signOut("Sign in again."));
  } else {
    signOut();
  }
})();
