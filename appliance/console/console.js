// The OX appliance's web console: every figure and action goes through the control
// API (POST /api, JSON-RPC 2.0, the control token as a bearer token), the same methods
// oxctl calls. No framework and no build step: the page is served as written.
"use strict";

const REFRESH_MS = 2000;
const GRAPH_POINTS = 60;

let token = sessionStorage.getItem("ox-token");
let nextId = 1;
let timer = null;
// Refreshes run one after another, in order (never two at once, never an older one
// drawn over a newer one): each is chained after the one before.
let chain = Promise.resolve();
// Throughput samples: [{at, read, write}] (bytes per second), newest last.
const samples = [];
let lastTotals = null;

const $ = (id) => document.getElementById(id);

/** Calls `method` with `params`; throws an Error with the daemon's message. */
async function call(method, params) {
  const resp = await fetch("/api", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: "Bearer " + token },
    body: JSON.stringify({ jsonrpc: "2.0", method, params: params || {}, id: nextId++ }),
  });
  if (resp.status === 401) {
    signOut("The token was refused.");
    throw new Error("not signed in");
  }
  const answer = await resp.json();
  if (answer.error) {
    throw new Error(answer.error.message);
  }
  return answer.result;
}

/** A table cell (or row) from text: never markup, whatever a name holds. */
function cell(text) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  return td;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  n = Number(n) || 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function age(secs) {
  if (secs === null || secs === undefined) return "";
  if (secs < 120) return secs + " s";
  if (secs < 7200) return Math.round(secs / 60) + " min";
  if (secs < 172800) return Math.round(secs / 3600) + " h";
  return Math.round(secs / 86400) + " d";
}

function when(unix) {
  return unix ? new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "";
}

/** Fills table `id`'s body with one row per item, each a list of cells (text or nodes). */
function fill(id, items, row) {
  const body = $(id).tBodies[0];
  const rows = items.map((item) => {
    const tr = document.createElement("tr");
    for (const c of row(item)) {
      tr.appendChild(c instanceof Node ? c : cell(c));
    }
    return tr;
  });
  body.replaceChildren(...rows);
}

/** A button that runs `action` and refreshes, showing any error. */
function button(label, action) {
  const b = document.createElement("button");
  b.textContent = label;
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      await action();
      await refresh();
    } catch (e) {
      showError(e);
    } finally {
      b.disabled = false;
    }
  });
  return b;
}

function showError(e) {
  $("error").textContent = e ? String(e.message || e) : "";
}

/** Keeps a select's choices, and its choice if still offered. */
function options(id, values) {
  const select = $(id);
  const chosen = select.value;
  select.replaceChildren(
    ...values.map(([value, label]) => {
      const o = document.createElement("option");
      o.value = value;
      o.textContent = label;
      return o;
    }),
  );
  if (values.some(([v]) => v === chosen)) select.value = chosen;
}

function progress(fraction, label) {
  const td = document.createElement("td");
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = fraction;
  td.append(bar, " " + label);
  return td;
}

function exportOf(e) {
  return e ? e.nqn : "";
}

/** Refreshes the page, after any refresh already running. */
function refresh() {
  chain = chain.then(redraw, redraw);
  return chain;
}

async function redraw() {
  const [list, snaps, policies, jobs, subsystems, stores, bdevs] = await Promise.all([
    call("volume_list"),
    call("snapshot_list"),
    call("policy_list"),
    call("job_list"),
    call("nvmf_get_subsystems"),
    call("store_list"),
    call("bdev_get_bdevs"),
  ]);
  showError(null);

  fill("volumes", list.volumes, (v) => [
    v.name,
    bytes(v.size_bytes),
    v.snapshots,
    bytes(v.read_bytes),
    bytes(v.write_bytes),
    exportOf(v.export),
    v.unavailable ? "unavailable: " + v.unavailable : "",
  ]);
  options("snapshot-volume", list.volumes.map((v) => [v.name, v.name]));
  options("snapshot-store", stores.map((s) => [s.name, s.name + " (" + s.kind + ")"]));

  fill("clones", list.clones, (c) => {
    const t = c.thickening;
    const w = c.warming;
    const f = c.fetched_bytes || {};
    const state = t
      ? (t.paused ? "paused" : "running") + ", " + t.fetched + " chunks"
      : c.thicken
        ? c.paused ? "paused" : "done or waiting"
        : "off";
    const actions = document.createElement("td");
    actions.append(
      button("thicken", () => call("clone_thicken", { name: c.name, action: "start" })),
      button("pause", () => call("clone_thicken", { name: c.name, action: "pause" })),
      button("resume", () => call("clone_thicken", { name: c.name, action: "resume" })),
    );
    const hydration = c.chunks_total
      ? progress(c.chunks_present / c.chunks_total, (c.hydration_pct || 0).toFixed(1) + " %")
      : cell(c.unavailable ? "unavailable: " + c.unavailable : "");
    hydration.className = "hydration";
    return [
      c.name,
      hydration,
      [bytes(f.client_miss), bytes(f.prefetch), bytes(f.thickening)].join(" / "),
      c.gets,
      state + (w ? "; warming up (" + w.fetched + " chunks, " + w.setbacks + " setbacks)" : ""),
      exportOf(c.export),
      actions,
    ];
  });

  const newest = [...snaps].sort((a, b) => b.created - a.created);
  options("clone-snapshot", newest.map((s) => [s.id, s.volume + " " + when(s.created) + " " + s.id.slice(0, 8)]));
  fill("snapshots", newest, (s) => [
    s.id.slice(0, 12),
    s.volume,
    s.store,
    when(s.created),
    bytes(s.data_bytes + s.meta_bytes),
    s.parent ? s.parent.slice(0, 12) : "(full)",
  ]);

  fill("policies", policies, (p) => [
    p.volume,
    p.store,
    age(p.every_s),
    [p.keep_last && "last " + p.keep_last, p.hourly && p.hourly + " hourly", p.daily && p.daily + " daily",
      p.weekly && p.weekly + " weekly", p.monthly && p.monthly + " monthly"].filter(Boolean).join(", "),
    p.rpo_s === null ? "no snapshot yet" : age(p.rpo_s),
    when(p.last_success),
    p.failures + (p.last_error ? ": " + p.last_error.error : ""),
  ]);

  const recent = [...jobs].sort((a, b) => b.id - a.id).slice(0, 20);
  fill("jobs", recent, (j) => [
    j.id,
    j.kind,
    j.target,
    j.state,
    j.total ? progress(j.done / j.total, j.done + "/" + j.total) : cell(""),
    j.error || "",
  ]);

  fill("exports", subsystems, (s) => [
    s.nqn,
    s.namespaces.map((n) => n.bdev).join(", "),
    s.listeners.join(", "),
    s.allow_any_host ? "any" : s.hosts.join(", "),
    (s.controllers || []).map((c) => c.hostnqn).join(", "),
  ]);

  fill("stores", stores, (s) => [
    s.name,
    s.kind,
    s.kind === "s3" ? s.endpoint + " " + s.bucket : s.path,
    s.check ? (s.check.ok ? "ok" : "failed") : "",
    s.retries,
  ]);

  sample(bdevs);
}

/** Adds a throughput sample from the devices' byte counts. */
function sample(bdevs) {
  const now = performance.now() / 1000;
  const totals = { read: 0, write: 0 };
  for (const b of bdevs) {
    totals.read += b.stats.read.bytes;
    totals.write += b.stats.write.bytes;
  }
  if (lastTotals) {
    const dt = Math.max(now - lastTotals.at, 0.001);
    samples.push({
      read: Math.max(totals.read - lastTotals.read, 0) / dt,
      write: Math.max(totals.write - lastTotals.write, 0) / dt,
    });
    if (samples.length > GRAPH_POINTS) samples.shift();
  }
  lastTotals = { at: now, ...totals };
  draw();
}

function draw() {
  const canvas = $("throughput");
  const g = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  g.clearRect(0, 0, w, h);
  const top = Math.max(1, ...samples.map((s) => Math.max(s.read, s.write)));
  const line = (key, colour) => {
    g.strokeStyle = colour;
    g.lineWidth = 2;
    g.beginPath();
    samples.forEach((s, i) => {
      const x = (i / (GRAPH_POINTS - 1)) * w;
      const y = h - (s[key] / top) * (h - 10);
      if (i === 0) g.moveTo(x, y);
      else g.lineTo(x, y);
    });
    g.stroke();
  };
  line("read", "#1f77b4");
  line("write", "#d62728");
  const last = samples[samples.length - 1];
  $("throughput-now").textContent = last
    ? "read " + bytes(last.read) + "/s, written " + bytes(last.write) + "/s (top of the graph: " + bytes(top) + "/s)"
    : "";
}

async function signIn(given) {
  token = given;
  const v = await call("ox_get_version");
  sessionStorage.setItem("ox-token", token);
  $("version").textContent = "oxd " + v.oxd + ", API " + v.api;
  $("login").hidden = true;
  $("console").hidden = false;
  $("sign-out").hidden = false;
  // A refresh that fails (the appliance busy, a connection refused) says so and the
  // next one tries again; the next starts REFRESH_MS after one ends.
  const tick = async () => {
    await refresh().catch(showError);
    if (token) timer = setTimeout(tick, REFRESH_MS);
  };
  await tick();
}

function signOut(why) {
  sessionStorage.removeItem("ox-token");
  token = null;
  if (timer) clearTimeout(timer);
  timer = null;
  $("console").hidden = true;
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = why || "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await signIn($("token").value.trim());
      $("login-error").textContent = "";
    } catch (e) {
      if (token) signOut(String(e.message || e));
    }
  });
  $("sign-out").addEventListener("click", () => signOut());
  $("snapshot-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await call("snapshot_create", { volume: $("snapshot-volume").value, store: $("snapshot-store").value });
      await refresh();
    } catch (e) {
      showError(e);
    }
  });
  $("clone-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const params = {
      name: $("clone-name").value,
      snapshot: $("clone-snapshot").value,
      thicken: $("clone-thicken").checked,
    };
    if ($("clone-nqn").value) {
      params.nqn = $("clone-nqn").value;
      params.allow_any_host = $("clone-any-host").checked;
    }
    try {
      await call("clone_create", params);
      $("clone-name").value = "";
      await refresh();
    } catch (e) {
      showError(e);
    }
  });
  // Signed in before this load: again, keeping the token unless it is refused (a
  // network error leaves it for the next try).
  if (token) signIn(token).catch((e) => { $("login-error").textContent = String(e.message || e); });
});
