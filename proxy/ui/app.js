// rollguard's rollout dashboard: reads the admin API of the origin that served it.
// No framework and no network beyond this origin. Every text from the gateway goes into
// the page as textContent, never as HTML: policy names and reasons come from files.
"use strict";

const TOKEN_KEY = "rollguard.token";
const ACTOR_KEY = "rollguard.actor";
const HISTORY = 600; // samples kept per rollout (20 minutes at the default 2 s)
const TIMELINE = 40; // audit entries shown per rollout, newest first
const TERMINAL = new Set(["promoted", "rolled_back", "concluded"]);
const SVG = "http://www.w3.org/2000/svg";

const ui = {
  timer: null,
  busy: false,
  history: new Map(), // rollout -> [{t, stable: summary, candidate: summary}]
  audit: new Map(), // rollout -> audit entries, oldest first
  generation: new Map(), // rollout -> generation its history belongs to
  pending: null, // {name, action} while the confirmation dialog is open
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// -- the admin API --

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  const given = token();
  if (given) headers.Authorization = `Bearer ${given}`;
  const response = await fetch(path, { ...options, headers, cache: "no-store", credentials: "omit" });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const text = body && typeof body.error === "string" ? body.error : `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, text);
  }
  return body;
}

async function loadAudit(name) {
  const known = ui.audit.get(name) || [];
  const last = known.length ? known[known.length - 1] : null;
  const query = new URLSearchParams({ rollout: name });
  if (last) query.set("since", last.ts);
  const doc = await api(`/admin/audit?${query}`);
  const fresh = doc.entries.filter((e) => !last || e.seq > last.seq);
  ui.audit.set(name, known.concat(fresh).slice(-2000));
}

// -- refreshing --

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = kind;
}

function showLogin(show, message = "") {
  $("login").hidden = !show;
  $("login-error").textContent = message;
  $("logout").hidden = show || !token();
  if (show) {
    $("rollouts").replaceChildren();
    $("empty").hidden = true;
    $("rejected").hidden = true;
    $("token").focus();
  }
}

async function refresh() {
  if (ui.busy) return;
  ui.busy = true;
  try {
    const overview = await api("/admin/rollouts");
    showLogin(false);
    const names = overview.rollouts.map((r) => r.name);
    const details = await Promise.all(names.map((n) => api(`/admin/rollouts/${encodeURIComponent(n)}`)));
    await Promise.all(names.map(loadAudit));
    const now = Date.now();
    for (const detail of details) remember(detail, now);
    render(overview, details);
    setStatus(`updated ${new Date(now).toLocaleTimeString()}`, "ok");
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
      if (token()) sessionStorage.removeItem(TOKEN_KEY);
      showLogin(true, error.status === 403 || ui.triedToken ? error.message : "");
      setStatus("signed out", "error");
    } else if (error instanceof ApiError && error.status === 429) {
      showLogin(true, error.message);
      setStatus("locked out for a while", "error");
    } else {
      setStatus(`cannot read the admin API: ${error.message}`, "error");
    }
  } finally {
    ui.busy = false;
    schedule();
  }
}

function schedule() {
  clearTimeout(ui.timer);
  const every = Number($("interval").value);
  if (every > 0 && !ui.pending && $("login").hidden) ui.timer = setTimeout(refresh, every);
}

function remember(detail, now) {
  const name = detail.name;
  if (ui.generation.get(name) !== detail.generation) {
    ui.history.set(name, []); // a new candidate: the old one's numbers do not continue
    ui.generation.set(name, detail.generation);
  }
  const series = ui.history.get(name);
  series.push({ t: now, stable: detail.variants.stable, candidate: detail.variants.candidate });
  if (series.length > HISTORY) series.splice(0, series.length - HISTORY);
}

// -- formatting --

const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(x < 0.001 && x > 0 ? 3 : 2)} %`);
const ms = (s) => (s === null || s === undefined ? "–" : `${(1000 * s).toFixed(s < 0.01 ? 2 : 1)} ms`);
const num = (x) => {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString();
  return Math.abs(x) >= 100 ? x.toFixed(1) : Math.abs(x) >= 0.01 ? x.toFixed(4) : x.toExponential(2);
};
const when = (ts) => new Date(ts).toLocaleString();
const duration = (s) => (s >= 3600 ? `${+(s / 3600).toFixed(1)} h` : s >= 60 ? `${+(s / 60).toFixed(1)} min` : `${s} s`);

// -- rendering --

function render(overview, details) {
  const rejected = overview.rejected || [];
  $("rejected").hidden = rejected.length === 0;
  $("rejected-list").replaceChildren(...rejected.map((r) => el("li", {}, el("code", {}, r.file), ": ", r.error)));
  const chain = overview.audit || {};
  $("audit-chain").hidden = chain.chain_ok !== false;
  $("audit-chain").textContent = chain.chain_ok === false ? `The audit chain did not verify at start: ${chain.problem}` : "";
  $("empty").hidden = details.length > 0;
  $("rollouts").replaceChildren(...details.map(card));
}

function card(d) {
  const checks = (d.last_decision && d.last_decision.checks) || [];
  const node = el(
    "article",
    { class: "rollout", "data-rollout": d.name, "data-phase": d.phase },
    el(
      "div",
      { class: "title" },
      el("h2", {}, d.name),
      el("span", { class: `badge phase-${d.phase}`, "data-field": "phase" }, d.phase.replaceAll("_", " ")),
      el("span", { class: "summary" }, `${d.model} · ${d.strategy} · ${d.stable} → ${d.candidate}`),
    ),
    el(
      "p",
      { class: "summary" },
      d.steps ? `step ${Math.min(d.step + 1, d.steps)}/${d.steps} · ` : "",
      "candidate weight ",
      el("strong", { "data-field": "weight" }, `${num(d.weight)} %`),
      d.approved_by ? ` · approved by ${d.approved_by}` : "",
      d.unavailable ? ` · candidate unavailable: ${d.unavailable}` : "",
      d.deadline ? ` · deadline ${duration(d.deadline)} undecided, then ${d.on_deadline}` : "",
      d.inconclusive ? ` · inconclusive: ${d.inconclusive}` : "",
    ),
    el("p", { class: "reason", "data-field": "reason" }, d.reason),
    actions(d),
    el("h3", {}, "Variants"),
    variants(d),
    el("h3", {}, "Over time"),
    charts(d),
    el("h3", {}, "Checks at the last tick"),
    checks.length ? checkTable(checks) : el("p", { class: "summary" }, "No tick has evaluated the checks yet."),
    srm(checks),
    el("h3", {}, "Decisions"),
    timeline(d.name),
  );
  return node;
}

function allowed(phase, action) {
  switch (action) {
    case "rollback":
      return phase !== "rolled_back";
    case "promote":
      return !TERMINAL.has(phase) || phase === "concluded";
    case "pause":
      return !TERMINAL.has(phase) && !["paused", "inconclusive", "waiting"].includes(phase);
    case "resume":
      return phase === "paused";
    case "approve":
      return phase === "awaiting_approval";
    default:
      return false;
  }
}

function actions(d) {
  const style = { rollback: "danger", promote: "primary" };
  return el(
    "div",
    { class: "actions" },
    ["pause", "resume", "approve", "promote", "rollback"].map((action) =>
      el(
        "button",
        {
          type: "button",
          class: style[action] || "",
          "data-action": action,
          disabled: !allowed(d.phase, action),
          onclick: () => ask(d, action),
        },
        action,
      ),
    ),
  );
}

function variants(d) {
  const head = ["role", "version", "availability", "requests", "routed", "errors", "error rate", "p50", "p99", "labelled", "accuracy", "agreement"];
  const rows = ["stable", "candidate"].map((role) => {
    const v = d.variants[role];
    return el(
      "tr",
      { "data-role": role },
      el("td", {}, role),
      el("td", {}, v.version),
      el("td", {}, v.availability),
      ...[v.requests, v.routed, v.errors].map((x) => el("td", { class: "num" }, num(x))),
      el("td", { class: "num" }, pct(v.error_rate)),
      el("td", { class: "num" }, ms(v.latency_p50)),
      el("td", { class: "num" }, ms(v.latency_p99)),
      el("td", { class: "num" }, num(v.labelled)),
      el("td", { class: "num" }, pct(v.accuracy)),
      el("td", { class: "num" }, pct(v.agreement)),
    );
  });
  return el("table", { class: "variants" }, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
}

function checkTable(checks) {
  const head = ["#", "metric", "verdict", "candidate", "bound", "interval", "p-value", "on fail", "why"];
  const rows = checks.map((c, i) => {
    const detail = c.detail || {};
    const interval = detail.ci_lower !== undefined && detail.ci_upper !== undefined ? `[${num(detail.ci_lower)}, ${num(detail.ci_upper)}]` : "–";
    return el(
      "tr",
      { "data-metric": c.metric },
      el("td", {}, i),
      el("td", {}, c.metric),
      el("td", {}, el("span", { class: `badge verdict-${c.verdict}` }, c.verdict)),
      el("td", { class: "num" }, num(c.value)),
      el("td", { class: "num" }, num(c.bound)),
      el("td", { class: "num" }, interval),
      el("td", { class: "num" }, num(detail.pvalue)),
      el("td", {}, c.on_fail),
      el("td", {}, detail.reason || ""),
    );
  });
  return el("table", { class: "checks" }, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
}

function srm(checks) {
  const check = checks.find((c) => c.metric === "srm");
  if (!check) return null;
  const d = check.detail || {};
  const byKey = d.units_stable !== undefined && d.units_candidate !== undefined;
  const counted = byKey
    ? `${num(d.units_stable)} stable and ${num(d.units_candidate)} candidate ${d.unit} (${num(d.routed_stable)} and ${num(d.routed_candidate)} requests)`
    : `${num(d.routed_stable)} stable and ${num(d.routed_candidate)} candidate ${d.unit || "requests"}`;
  return el(
    "p",
    { class: "summary", "data-field": "srm" },
    `Sample ratio: ${counted} since the split last changed; `,
    `candidate share ${pct(d.observed_share)} against ${num(d.weight)} % configured; anytime-valid p = ${num(d.pvalue)} `,
    el("span", { class: `badge verdict-${check.verdict}` }, check.verdict),
  );
}

function timeline(name) {
  const entries = (ui.audit.get(name) || []).slice(-TIMELINE).reverse();
  if (!entries.length) return el("p", { class: "summary" }, "No audit entries.");
  const rows = entries.map((e) => {
    const data = e.data || {};
    const state = data.state || {};
    const said = data.reason || data.error || (data.changed ? `changed: ${data.changed.join(", ") || "(new)"}` : "");
    const why = data.note ? `${said} — “${data.note}”` : said;
    return el(
      "tr",
      { "data-kind": e.kind },
      el("td", { class: "when" }, when(e.ts)),
      el("td", {}, e.kind),
      el("td", {}, e.actor),
      el("td", {}, state.phase || ""),
      el("td", { class: "num" }, state.weight === undefined ? "" : `${num(state.weight)} %`),
      el("td", {}, why),
    );
  });
  const head = ["when", "what", "who", "phase", "weight", "reason"];
  return el("div", { class: "timeline" }, el("table", {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, rows)));
}

// -- charts: inline SVG, no library --

function charts(d) {
  const history = ui.history.get(d.name) || [];
  const weights = [];
  for (const e of ui.audit.get(d.name) || []) {
    if (e.data && e.data.state && typeof e.data.state.weight === "number" && e.data.state.generation === d.generation) {
      weights.push([Date.parse(e.ts), e.data.state.weight / 100]);
    }
  }
  weights.push([Date.now(), d.weight / 100]);
  const perVariant = (field) =>
    ["stable", "candidate"].map((role) => ({
      role,
      points: history.filter((h) => h[role][field] !== null && h[role][field] !== undefined).map((h) => [h.t, h[role][field]]),
    }));
  const agreement = { role: "agreement", points: history.filter((h) => h.candidate.agreement !== null).map((h) => [h.t, h.candidate.agreement]) };
  return el(
    "div",
    { class: "grid" },
    chart("candidate weight", [{ role: "weight", points: weights }], pct, { step: true, min: 0, max: 1 }),
    chart("requests in window", perVariant("requests"), num, { min: 0 }),
    chart("error rate", perVariant("error_rate"), pct, { min: 0 }),
    chart("latency p50", perVariant("latency_p50"), ms, { min: 0 }),
    chart("latency p99", perVariant("latency_p99"), ms, { min: 0 }),
    chart("accuracy · candidate agreement", [...perVariant("accuracy"), agreement], pct, { min: 0, max: 1 }),
  );
}

function chart(label, series, format, { step = false, min = null, max = null } = {}) {
  const width = 320;
  const height = 120;
  const pad = { left: 52, right: 6, top: 6, bottom: 16 };
  const points = series.flatMap((s) => s.points);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const box = el("div", { class: "chart" }, el("div", { class: "label" }, label), svg, legend(series));
  if (!points.length) {
    svg.append(svgText(width / 2 - 20, height / 2, "no data yet"));
    return box;
  }
  const t0 = Math.min(...points.map((p) => p[0]));
  const t1 = Math.max(...points.map((p) => p[0]), t0 + 1000);
  let lo = min === null ? Math.min(...points.map((p) => p[1])) : min;
  let hi = max === null ? Math.max(...points.map((p) => p[1])) : Math.max(max, ...points.map((p) => p[1]));
  if (hi <= lo) hi = lo + (lo === 0 ? 1 : Math.abs(lo));
  const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - ((v - lo) / (hi - lo)) * (height - pad.top - pad.bottom);
  svg.append(svgLine(pad.left, pad.top, pad.left, height - pad.bottom), svgLine(pad.left, height - pad.bottom, width - pad.right, height - pad.bottom));
  svg.append(svgText(2, pad.top + 8, format(hi)), svgText(2, height - pad.bottom, format(lo)));
  const end = svgText(width - pad.right, height - 3, new Date(t1).toLocaleTimeString());
  end.setAttribute("text-anchor", "end");
  svg.append(svgText(pad.left, height - 3, new Date(t0).toLocaleTimeString()), end);
  for (const s of series) {
    if (!s.points.length) continue;
    let path = "";
    s.points.forEach(([t, v], i) => {
      if (i === 0) path += `M${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      else if (step) path += `H${x(t).toFixed(1)}V${y(v).toFixed(1)}`;
      else path += `L${x(t).toFixed(1)},${y(v).toFixed(1)}`;
    });
    if (s.points.length === 1) path += `h2`;
    const line = document.createElementNS(SVG, "path");
    line.setAttribute("d", path);
    line.setAttribute("class", `line ${s.role}`);
    svg.append(line);
  }
  return box;
}

function svgLine(x1, y1, x2, y2) {
  const line = document.createElementNS(SVG, "line");
  for (const [k, v] of Object.entries({ x1, y1, x2, y2 })) line.setAttribute(k, v);
  line.setAttribute("class", "axis");
  return line;
}

function svgText(x, y, text) {
  const node = document.createElementNS(SVG, "text");
  node.setAttribute("x", x);
  node.setAttribute("y", y);
  node.textContent = text;
  return node;
}

function legend(series) {
  return el("div", { class: "legend" }, series.map((s) => el("span", { class: s.role }, `■ ${s.role} `)));
}

// -- actions, each confirmed --

function ask(d, action) {
  ui.pending = { name: d.name, action };
  clearTimeout(ui.timer);
  $("confirm-title").textContent = `${action} ${d.name}?`;
  const effect = {
    rollback: `All of ${d.model}'s traffic goes back to ${d.stable}; the rollout ends rolled back.`,
    promote: `${d.candidate} takes all of ${d.model}'s traffic; the rollout ends promoted.`,
    pause: `The rollout stops moving at ${num(d.weight)} %; a failed rollback check still acts.`,
    resume: "The rollout moves on from where it was paused.",
    approve: "The rollout may take its last step.",
  }[action];
  $("confirm-text").textContent = effect;
  $("confirm-actor").value = sessionStorage.getItem(ACTOR_KEY) || "";
  $("confirm-reason").value = "";
  $("confirm-error").textContent = "";
  $("confirm").showModal();
  ($("confirm-actor").value ? $("confirm-reason") : $("confirm-actor")).focus();
}

async function confirmAction(event) {
  event.preventDefault();
  const pending = ui.pending;
  if (!pending) return;
  const actor = $("confirm-actor").value.trim();
  if (!actor) {
    $("confirm-error").textContent = "Say who acts: the audit log records it.";
    return;
  }
  sessionStorage.setItem(ACTOR_KEY, actor);
  $("confirm-ok").disabled = true;
  try {
    await api(`/admin/rollouts/${encodeURIComponent(pending.name)}/${pending.action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ actor, reason: $("confirm-reason").value.trim() || undefined }),
    });
    closeDialog();
    setStatus(`${pending.action} ${pending.name}: done`, "ok");
    refresh();
  } catch (error) {
    $("confirm-error").textContent = error.message;
  } finally {
    $("confirm-ok").disabled = false;
  }
}

function closeDialog() {
  ui.pending = null;
  if ($("confirm").open) $("confirm").close();
  schedule();
}

// -- start --

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    ui.triedToken = true;
    setStatus("signing in…", "");
    refresh();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    ui.triedToken = false;
    showLogin(true);
    clearTimeout(ui.timer);
  });
  $("interval").addEventListener("change", schedule);
  $("confirm-form").addEventListener("submit", confirmAction);
  $("confirm-cancel").addEventListener("click", closeDialog);
  $("confirm").addEventListener("cancel", () => {
    ui.pending = null;
    schedule();
  });
  refresh();
});
