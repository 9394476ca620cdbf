// The jobz dashboard: one page over the HTTP API, polling it every second.
// Every value from the API is put on the page as text (textContent), never as HTML.
"use strict";

const POLL_MS = 1000;
const JOBS_SHOWN = 50;
const FINAL = ["succeeded", "failed", "timed_out", "cancelled"];
const RETRYABLE = ["failed", "timed_out", "cancelled"];

const state = {
  token: sessionStorage.getItem("jobz-token") || "",
  filter: { status: "", job_name: "", run_id: "" },
  job: null, // the id shown in the job panel
  auth: null, // what the caller may do (GET /auth)
  log: { id: null, offset: 0 },
  busy: false,
};

// ---- small helpers ----

function $(id) {
  return document.getElementById(id);
}

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "data") for (const [k, v] of Object.entries(value)) node.dataset[k] = v;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fill(tbody, rows, empty) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "9", class: "muted" }, empty))]));
}

function when(text) {
  if (!text) return "-";
  const t = new Date(text);
  if (isNaN(t)) return text;
  const ago = (Date.now() - t.getTime()) / 1000;
  const rel = Math.abs(ago) < 60 ? `${Math.round(ago)}s` : Math.abs(ago) < 3600 ? `${Math.round(ago / 60)}m` : `${Math.round(ago / 3600)}h`;
  return `${t.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z")} (${ago >= 0 ? rel + " ago" : "in " + rel.replace("-", "")})`;
}

function status(value) {
  return el("span", { class: `status status-${value}` }, value);
}

function short(id) {
  return id ? id.slice(0, 8) + "…" + id.slice(-4) : "-";
}

function jobLink(id) {
  if (!id) return "-";
  return el("a", { href: `#job=${encodeURIComponent(id)}`, class: "id", title: id }, short(id));
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers["Authorization"] = `Bearer ${state.token}`;
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  const text = await response.text();
  if (!response.ok) {
    let message = text;
    try {
      message = JSON.parse(text).error || text;
    } catch (_) {
      /* not JSON: keep the text */
    }
    const error = new Error(`${response.status}: ${message}`);
    error.status = response.status;
    throw error;
  }
  return { response, text };
}

async function json(path) {
  const { text } = await api(path);
  return JSON.parse(text);
}

function showError(message) {
  const box = $("error");
  box.hidden = !message;
  box.textContent = message || "";
}

// ---- sections ----

function renderQueues(data) {
  const rows = (data.queues || []).map((q) =>
    el(
      "tr",
      { class: "clickable", onclick: () => setFilter({ job_name: q.job_name }) },
      el("td", {}, q.job_name),
      el("td", {}, q.queued),
      el("td", {}, q.running),
      el("td", { class: "muted" }, q.held_by ? q.held_by.message : ""),
    ),
  );
  fill($("queues").tBodies[0], rows, "no jobs queued or running");
}

function renderJobs(data) {
  const rows = (data.jobs || []).map((j) =>
    el(
      "tr",
      { class: "clickable", data: { jobId: j.id, status: j.status }, onclick: () => (location.hash = `job=${j.id}`) },
      el("td", { class: "id", title: j.id }, short(j.id)),
      el("td", {}, j.job_name),
      el("td", {}, status(j.status), j.held_by ? el("span", { class: "muted" }, ` (held: ${j.held_by.limit})`) : null),
      el("td", {}, j.attempts),
      el("td", {}, j.worker || "-"),
      el("td", {}, when(j.created_at)),
      el("td", {}, when(j.finished_at)),
    ),
  );
  fill($("jobs").tBodies[0], rows, "no jobs");
}

function renderWorkers(data) {
  const rows = (data.workers || []).map((w) => {
    const drift = (w.jobs || []).filter((j) => j.matches === false).map((j) => j.name);
    return el(
      "tr",
      { data: { worker: w.name } },
      el("td", {}, w.name),
      el("td", {}, w.host),
      el("td", {}, `${w.running}/${w.concurrency}`),
      el("td", {}, (w.jobs || []).length, drift.length ? el("span", { class: "status-failed" }, ` (drift: ${drift.join(", ")})`) : null),
      el("td", {}, when(w.last_heartbeat)),
    );
  });
  fill($("workers").tBodies[0], rows, "no workers connected");
}

function renderGates(data) {
  const gates = Array.isArray(data) ? data : data.gates || [];
  const blocks = gates.map((g) => {
    const items = [];
    for (const k of g.open || []) {
      const pct = k.needed ? Math.round((100 * k.done) / k.needed) : 0;
      items.push(
        el("li", {}, `key ${k.key}: `, el("span", { class: "bar" }, el("span", { style: `width:${pct}%` })), ` ${k.progress}`, k.failed ? el("span", { class: "status-failed" }, " (an upstream job failed)") : null),
      );
    }
    for (const k of g.fired || []) items.push(el("li", {}, `key ${k.key}: fired `, jobLink(k.job_id), k.error ? ` (${k.error})` : ""));
    for (const k of g.timed_out || []) items.push(el("li", {}, `key ${k.key}: timed out `, jobLink(k.job_id)));
    for (const k of g.failed || []) items.push(el("li", {}, `key ${k.key}: failed `, jobLink(k.job_id)));
    return el(
      "div",
      { class: "gate", data: { gate: g.name } },
      el("strong", {}, g.name),
      el("span", { class: "muted" }, ` after ${(g.after || []).join(", ")} × ${g.count} → ${g.then}`),
      el("ul", {}, ...(items.length ? items : [el("li", { class: "muted" }, "no keys yet")])),
    );
  });
  $("gates").replaceChildren(...(blocks.length ? blocks : [el("p", { class: "muted" }, "no gates in the job file")]));
}

function renderSchedules(data) {
  const list = Array.isArray(data) ? data : data.schedules || [];
  const rows = list.map((s) =>
    el(
      "tr",
      {},
      el("td", {}, s.job_name),
      el("td", {}, el("code", {}, s.cron)),
      el("td", {}, s.timezone),
      el("td", {}, when(s.next)),
      el("td", {}, when(s.last_fired)),
      el("td", {}, jobLink(s.last_job_id)),
    ),
  );
  fill($("schedules").tBodies[0], rows, "no schedules in the job file");
}

// ---- one job ----

async function renderJob() {
  const id = state.job;
  const section = $("job-section");
  if (!id) {
    section.hidden = true;
    return;
  }
  const job = await json(`jobs/${encodeURIComponent(id)}`);
  if (state.job !== id) return;
  section.hidden = false;
  section.dataset.jobId = job.id;
  section.dataset.status = job.status;
  $("job-title").replaceChildren(el("span", { class: "id" }, job.id), " ", job.job_name, " ", status(job.status));
  const progress = job.progress ? `${Math.round(job.progress.percent)}% ${job.progress.message || ""}` : null;
  const fields = [
    ["params", Object.entries(job.params || {}).map(([k, v]) => `${k}=${v}`).join(" ") || "-"],
    ["status", job.status + (progress ? ` — ${progress}` : "")],
    job.held_by ? ["held by", job.held_by.message] : null,
    ["worker", job.worker || "-"],
    ["attempts", job.attempts],
    ["exit code", job.exit_code ?? "-"],
    job.error ? ["error", job.error] : null,
    ["origin", job.origin ? job.origin.kind + (job.origin.gate ? ` ${job.origin.gate} key ${job.origin.key}` : "") : "-"],
    ["created", when(job.created_at)],
    ["queued", when(job.queued_at)],
    ["started", when(job.started_at)],
    ["finished", when(job.finished_at)],
    job.cancelled_at ? ["cancelled", when(job.cancelled_at)] : null,
    job.not_before ? ["retry at", when(job.not_before)] : null,
  ].filter(Boolean);
  $("job-fields").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const attempts = (job.attempt_list || []).map((a) =>
    el("tr", {}, el("td", {}, a.attempt), el("td", {}, a.worker || "-"), el("td", {}, a.status ? status(a.status) : "-", a.stale ? " (stale)" : ""), el("td", {}, a.exit_code ?? "-"), el("td", {}, when(a.started_at)), el("td", {}, when(a.finished_at))),
  );
  fill($("job-attempts").tBodies[0], attempts, "not dispatched yet");
  // Offered only where the caller's token allows them (`GET /auth`).
  const admin = state.auth ? state.auth.admin === true : false;
  $("job-cancel").hidden = !admin || FINAL.includes(job.status);
  $("job-retry").hidden = !admin || !RETRYABLE.includes(job.status);
  $("job-run").replaceChildren(jobLink(job.run_id));
  await renderChain(job);
  await renderLog(job);
}

async function renderChain(job) {
  const run = await json(`jobs?run_id=${encodeURIComponent(job.run_id)}&limit=200`);
  const jobs = (run.jobs || []).slice().reverse(); // oldest first
  const children = new Map();
  for (const j of jobs) {
    const parent = j.parent_id || "";
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent).push(j);
  }
  const known = new Set(jobs.map((j) => j.id));
  const roots = jobs.filter((j) => !j.parent_id || !known.has(j.parent_id));
  const item = (j, depth) =>
    el(
      "li",
      { class: j.id === job.id ? "current" : "" },
      jobLink(j.id),
      " ",
      el("span", { class: "name" }, j.job_name),
      " ",
      status(j.status),
      depth < 20 && children.has(j.id) ? el("ul", {}, ...children.get(j.id).map((c) => item(c, depth + 1))) : null,
    );
  $("job-chain").replaceChildren(...roots.map((j) => item(j, 0)));
}

async function renderLog(job) {
  const pre = $("job-log");
  if (state.log.id !== job.id) {
    state.log = { id: job.id, offset: 0 };
    pre.textContent = "";
  }
  const { response, text } = await api(`jobs/${encodeURIComponent(job.id)}/log?offset=${state.log.offset}`);
  if (state.log.id !== job.id) return;
  const next = Number(response.headers.get("jobz-next-offset"));
  if (text) {
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(text);
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }
  if (Number.isFinite(next)) state.log.offset = next;
}

async function act(what) {
  const id = state.job;
  if (!id) return;
  const out = $("job-action-result");
  try {
    await api(`jobs/${encodeURIComponent(id)}/${what}`, { method: "POST" });
    out.textContent = what === "cancel" ? "cancelled" : "queued again";
  } catch (e) {
    out.textContent = e.status === 401 || e.status === 403 ? `not allowed: ${e.message}` : e.message;
  }
  refresh();
}

// ---- the loop ----

function jobsQuery() {
  const q = new URLSearchParams({ limit: String(JOBS_SHOWN) });
  for (const [k, v] of Object.entries(state.filter)) if (v) q.set(k, v);
  return `jobs?${q}`;
}

async function refresh() {
  if (state.busy) return;
  state.busy = true;
  try {
    const calls = [
      ["auth", (a) => (state.auth = a)],
      ["queues", renderQueues],
      [jobsQuery(), renderJobs],
      ["workers", renderWorkers],
      ["gates", renderGates],
      ["schedules", renderSchedules],
    ];
    const results = await Promise.allSettled(calls.map(([path]) => json(path)));
    const errors = [];
    results.forEach((r, i) => (r.status === "fulfilled" ? calls[i][1](r.value) : errors.push(`${calls[i][0]}: ${r.reason.message}`)));
    if (results.some((r) => r.status === "rejected" && r.reason.status === 401)) {
      errors.unshift("this front door needs a token with the read scope: paste it in the token field above");
    }
    try {
      await renderJob();
    } catch (e) {
      errors.push(`job: ${e.message}`);
    }
    showError(errors.length ? errors.join(" · ") : "");
    let healthy = false;
    try {
      healthy = (await fetch("healthz", { cache: "no-store" })).ok;
    } catch (_) {
      healthy = false;
    }
    $("health").className = healthy ? "dot up" : "dot down";
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } finally {
    state.busy = false;
  }
}

function setFilter(change) {
  Object.assign(state.filter, change);
  $("filter-status").value = state.filter.status;
  $("filter-job").value = state.filter.job_name;
  $("filter-run").value = state.filter.run_id;
  refresh();
}

function fromHash() {
  const match = /(?:^#|&)job=([^&]+)/.exec(location.hash);
  const id = match ? decodeURIComponent(match[1]) : null;
  if (id !== state.job) {
    state.job = id;
    $("job-action-result").textContent = "";
    refresh();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = state.token;
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("jobz-token", state.token);
    refresh();
  });
  $("filters").addEventListener("submit", (e) => {
    e.preventDefault();
    setFilter({ status: $("filter-status").value, job_name: $("filter-job").value.trim(), run_id: $("filter-run").value.trim() });
  });
  $("job-close").addEventListener("click", (e) => {
    e.preventDefault();
    location.hash = "";
  });
  $("job-cancel").addEventListener("click", () => act("cancel"));
  $("job-retry").addEventListener("click", () => act("retry"));
  window.addEventListener("hashchange", fromHash);
  fromHash();
  refresh();
  setInterval(refresh, POLL_MS);
});
