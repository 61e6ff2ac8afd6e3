// The dashboard's pages, rendered from the JSON endpoints and refreshed by polling (no reload).
"use strict";
const params = new URLSearchParams(location.search);
if (params.get("token")) sessionStorage.setItem("hs-token", params.get("token"));
const TOKEN = sessionStorage.getItem("hs-token");
const app = document.getElementById("app");
const view = {sort: "val_acc", order: "desc", stage: "", state: "", limit: 100};
let settings = {refresh_ms: 2000, actions: false};
let scatterAt = 0;

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}
const esc = encodeURIComponent;
const num = (x, d) => (x === null || x === undefined) ? "-" : (typeof x === "number" ? (d === undefined ? fmt(x) : x.toFixed(d)) : String(x));
const cell = x => (x !== null && typeof x === "object") ? JSON.stringify(x) : num(x);
const ago = t => t ? `${Math.max(0, Math.round(Date.now() / 1000 - t))} s ago` : "-";

async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

async function act(url, payload) {
  const headers = {"Content-Type": "application/json"};
  if (TOKEN) headers["X-Hypersearch-Token"] = TOKEN;
  const r = await fetch(url, {method: "POST", headers, body: JSON.stringify(payload || {})});
  const body = await r.json();
  return {status: r.status, body};
}

function section(id, title, ...content) { return h("section", {id}, h("h2", {}, title), ...content); }

function table(id, columns, rows) {
  return h("table", {id}, h("thead", {}, h("tr", {}, columns.map(c => c instanceof Node ? c : h("th", {}, c)))),
           h("tbody", {}, rows));
}

// experiment list ---------------------------------------------------------------------------------------
async function listPage() {
  const list = await getJSON("/api/experiments");
  app.replaceChildren(section("experiments", "experiments", table("experiment-list",
    ["experiment", "trials", "finished", "running", "best val acc"],
    list.map(e => h("tr", {}, h("td", {}, h("a", {href: `/e/${esc(e.name)}`}, e.name)), h("td", {class: "num"}, e.trials),
                     h("td", {class: "num"}, e.finished), h("td", {class: "num"}, e.running),
                     h("td", {class: "num"}, num(e.best, 4)))))));
}

// experiment page -----------------------------------------------------------------------------------------
function experimentSkeleton(name) {
  document.getElementById("crumbs").replaceChildren(" / ", h("a", {href: `/e/${esc(name)}`}, name));
  app.replaceChildren(
    h("div", {class: "row"},
      section("summary", "progress", h("div", {class: "kpis"},
        h("div", {}, h("div", {class: "big", id: "finished"}, "-"), "finished"),
        h("div", {}, h("div", {class: "big", id: "running"}, "-"), "running"),
        h("div", {}, h("div", {class: "big", id: "total"}, "-"), "trials"),
        h("div", {}, h("div", {class: "big", id: "best"}, "-"), "best val acc")),
        h("div", {id: "funnel"}), h("div", {id: "next-stage"}), h("ul", {id: "findings"})),
      section("workers-section", "workers", h("div", {class: "muted", id: "redis"}), h("div", {id: "workers"}))),
    h("div", {class: "row"},
      section("curves-section", "learning curves (validation accuracy; running trials bold)",
              el("svg", {id: "curves"}), el("svg", {id: "loss-curves"}), h("div", {class: "legend", id: "legend"}))),
    section("leaderboard-section", "leaderboard", h("div", {id: "filters"}), h("div", {class: "scroll", id: "board"})),
    section("scatter-section", "validation accuracy against each hyperparameter (⚑: border flag)",
            h("div", {class: "charts", id: "scatter"})),
    section("ensembles-section", "ensembles", h("div", {id: "ensembles"})));
}

function renderFunnel(s) {
  return table("funnel-table", ["stage", "status", ...s.states, "total"], s.funnel.map(f =>
    h("tr", {}, h("td", {}, f.stage), h("td", {}, f.status || "-"),
      s.states.map(st => h("td", {class: `num state-${st}`, "data-state": st}, f.counts[st] ?? 0)),
      h("td", {class: "num"}, f.total))));
}

function renderWorkers(s) {
  if (!s.workers.length) return h("p", {class: "muted"}, "no worker known");
  return table("workers-table", ["worker", "alive", "state", "trial", "last heartbeat", "quarantined"],
    s.workers.map(w => h("tr", {}, h("td", {}, w.name), h("td", {}, w.alive === null ? "?" : w.alive ? "yes" : "no"),
      h("td", {}, w.state || "-"),
      h("td", {}, w.trial && w.experiment === s.experiment ? h("a", {href: `/e/${esc(s.experiment)}/trials/${esc(w.trial)}`}, w.trial) : (w.trial || "-")),
      h("td", {}, ago(w.last_heartbeat) + (w.source === "storage" ? " (storage)" : "")),
      h("td", {class: w.quarantined ? "flag" : ""}, w.quarantined ? "yes" : "no"))));
}

function renderFilters(s) {
  const select = (id, key, options) => h("select", {id, onchange: e => { view[key] = e.target.value; refresh(); }},
    h("option", {value: ""}, `every ${key}`), options.map(o => {
      const opt = h("option", {value: o}, o); if (view[key] === o) opt.selected = true; return opt; }));
  return h("span", {}, select("filter-stage", "stage", s.stages), " ",
           select("filter-state", "state", ["COMPLETED", "KILLED", "DIVERGED", "FAILED", "RUNNING", "QUEUED"]),
           h("span", {class: "muted"}, ` ${s.leaderboard.matching} matching, best ${s.leaderboard.rows.length} shown; click a column to sort`));
}

function renderBoard(s) {
  const cols = ["trial", "stage", "state", "val_acc", "train_acc", "best_epoch", "epochs", "seconds", "worker", ...s.params, "reason"];
  const head = cols.map(c => h("th", {class: "sortable", "data-column": c, onclick: () => {
    view.order = view.sort === c && view.order === "desc" ? "asc" : "desc"; view.sort = c; refresh(); }},
    c + (view.sort === c ? (view.order === "desc" ? " ▼" : " ▲") : "")));
  const rows = s.leaderboard.rows.map(r => h("tr", {"data-trial": r.trial}, cols.map(c => {
    if (c === "trial") return h("td", {}, h("a", {class: "trial-link", href: `/e/${esc(s.experiment)}/trials/${esc(r.trial)}`}, r.trial));
    if (c === "state") return h("td", {class: `state-${r.state}`}, r.state);
    const v = r[c];
    return h("td", {class: typeof v === "number" ? "num" : ""}, ["val_acc", "train_acc"].includes(c) ? num(v, 4) : cell(v));
  })));
  return table("leaderboard", head, rows);
}

function renderCurves(s) {
  const series = s.curves.map(c => ({name: c.trial, bold: c.running, dashed: !c.running && c.state !== "COMPLETED",
                                     points: c.epoch.map((e, i) => [e, c.val_acc[i]])}));
  lineChart(document.getElementById("curves"), series, {title: "val acc by epoch", width: 520});
  lineChart(document.getElementById("loss-curves"), s.curves.map(c => ({name: c.trial, bold: c.running,
    points: c.epoch.map((e, i) => [e, c.train_loss[i]])})), {title: "train loss by epoch (log)", ylog: true, width: 520});
  document.getElementById("legend").replaceChildren(...s.curves.map((c, i) =>
    h("span", {style: `color:${PALETTE[i % PALETTE.length]}`}, `${c.trial}${c.running ? " (running)" : ""}`)));
}

function renderEnsembles(s) {
  if (!s.ensembles.length) return h("p", {class: "muted"}, "none yet (master ensemble --top K)");
  return table("ensembles-table", ["ensemble", "method", "members", "val acc", "test acc", "gain (test)"],
    s.ensembles.map(e => h("tr", {}, h("td", {}, e.name), h("td", {}, e.method + (e.ema ? ", EMA" : "")),
      h("td", {}, (e.trials || []).join(", ")), h("td", {class: "num"}, num(e.scores?.val?.ensemble, 4)),
      h("td", {class: "num"}, num(e.scores?.test?.ensemble, 4)),
      h("td", {class: "num"}, e.scores?.test ? `${(100 * e.scores.test.gain).toFixed(2)} pts` : "-"))));
}

async function renderScatter(name) {
  const d = await getJSON(`/api/e/${esc(name)}/scatter`);
  const stages = [...new Set(d.stage)];
  const colors = d.stage.map(st => PALETTE[stages.indexOf(st) % PALETTE.length]);
  const box = document.getElementById("scatter");
  box.replaceChildren(...d.params.map(p => {
    const svg = el("svg", {"data-param": p.name});
    scatterChart(svg, p, d.val_acc, colors, {});
    return svg;
  }));
  if (!d.params.length) box.replaceChildren(h("p", {class: "muted"}, "no finished trial yet"));
}

async function experimentPage(name) {
  const q = new URLSearchParams({sort: view.sort, order: view.order, stage: view.stage, state: view.state, limit: view.limit});
  const s = await getJSON(`/api/e/${esc(name)}/state?${q}`);
  if (!document.getElementById("summary")) experimentSkeleton(name);
  document.getElementById("finished").textContent = s.finished;
  document.getElementById("running").textContent = s.funnel.reduce((n, f) => n + (f.counts.RUNNING || 0), 0);
  document.getElementById("total").textContent = s.total;
  const best = s.curves.filter(c => !c.running).map(c => Math.max(...c.val_acc.filter(v => v !== null)));
  document.getElementById("best").textContent = best.length ? Math.max(...best).toFixed(4) : "-";
  document.getElementById("funnel").replaceChildren(renderFunnel(s));
  document.getElementById("findings").replaceChildren(...s.findings.map(f => h("li", {class: f.kind === "quarantine" ? "flag" : ""}, f.message)));
  document.getElementById("redis").textContent = s.redis;
  document.getElementById("workers").replaceChildren(renderWorkers(s));
  document.getElementById("filters").replaceChildren(renderFilters(s));
  document.getElementById("board").replaceChildren(renderBoard(s));
  document.getElementById("ensembles").replaceChildren(renderEnsembles(s));
  const next = document.getElementById("next-stage");
  next.replaceChildren();
  if (settings.actions && s.next_stage) next.append(h("button", {id: "launch-next", onclick: async () => {
    const r = await act(`/api/e/${esc(name)}/stages/${esc(s.next_stage)}/launch`);
    next.append(h("span", {class: r.status === 200 ? "" : "error"}, ` ${r.status}: ${r.body.error || "launched"}`)); }},
    `launch stage ${s.next_stage}`));
  renderCurves(s);
  if (Date.now() - scatterAt > Math.max(5000, 3 * settings.refresh_ms)) { scatterAt = Date.now(); await renderScatter(name); }
  document.getElementById("status").textContent = `updated ${new Date(s.time * 1000).toLocaleTimeString()}`;
}

// trial page ------------------------------------------------------------------------------------------------
function babysitTable(t) {
  const rows = [];
  for (const b of t.babysit) {
    for (const [layer, a] of Object.entries(b.activations || {})) {
      const g = (b.gradients || {})[layer] || {};
      rows.push(h("tr", {}, h("td", {}, b.epoch), h("td", {}, layer), h("td", {class: "num"}, num(a.mean)),
        h("td", {class: "num"}, num(a.std)), h("td", {class: "num"}, num(a.dead_fraction)), h("td", {class: "num"}, num(g.norm)),
        h("td", {class: "num"}, (a.nonfinite || 0) + (g.nonfinite || 0))));
    }
  }
  return rows.length ? table("babysit", ["epoch", "layer", "act. mean", "act. std", "dead fraction", "grad norm", "non-finite"], rows)
                     : h("p", {class: "muted"}, "no babysitting snapshot recorded");
}

async function trialPage(name, trial) {
  const t = await getJSON(`/api/e/${esc(name)}/trials/${esc(trial)}`);
  document.getElementById("crumbs").replaceChildren(" / ", h("a", {href: `/e/${esc(name)}`}, name), " / ", trial);
  const r = t.result || {};
  const epochs = t.history.map(x => x.epoch);
  const layers = [...new Set(t.history.flatMap(x => Object.keys(x.update_ratio || {})))];
  const killBox = h("div", {id: "kill-box"});
  if (settings.actions && (!t.result || !["COMPLETED", "KILLED", "DIVERGED", "FAILED"].includes(r.state))) {
    killBox.append(h("button", {id: "kill", onclick: async () => {
      const res = await act(`/api/e/${esc(name)}/trials/${esc(trial)}/kill`, {reason: "stopped from the dashboard"});
      killBox.append(h("span", {class: res.status === 200 ? "" : "error"}, ` ${res.status}: ${res.body.error || res.body.state}`)); }},
      "kill this trial"));
  }
  const old = document.getElementById("trial-summary");
  const summary = section("trial-summary", `trial ${trial}`, h("p", {id: "trial-state", class: `state-${r.state || "QUEUED"}`},
      `${r.state || "QUEUED"} ${r.reason ? "(" + r.reason + ")" : ""}`),
    h("p", {}, `best val acc ${num(r.best_val_acc, 4)} at epoch ${num(r.best_epoch)}; ${epochs.length} epochs recorded; worker ${r.worker || (t.live || {}).worker || "-"}`),
    killBox);
  if (old && old.querySelector("#kill-box span")) summary.querySelector("#kill-box").replaceWith(old.querySelector("#kill-box"));
  const charts = h("div", {class: "charts"});
  const acc = el("svg", {id: "trial-acc"}), loss = el("svg", {id: "trial-loss"}), ratio = el("svg", {id: "trial-ratio"}),
        trace = el("svg", {id: "trial-trace"});
  charts.append(acc, loss, ratio, trace);
  app.replaceChildren(summary, section("trial-curves", "curves", charts),
    section("trial-babysit", "babysitting statistics", babysitTable(t)),
    h("div", {class: "row"}, section("trial-spec", "spec", h("pre", {id: "spec"}, JSON.stringify(t.spec, null, 2))),
      section("trial-checkpoints", "checkpoints", table("checkpoints", ["file", "epoch", "val acc", "bytes"],
        t.checkpoints.map(c => h("tr", {}, h("td", {}, c.file), h("td", {class: "num"}, c.epoch), h("td", {class: "num"}, num(c.val_acc, 4)), h("td", {class: "num"}, c.bytes)))))),
    section("trial-events", "events", table("events", ["time", "event", "state", "reason"],
      t.events.map(e => h("tr", {}, h("td", {}, new Date(e.time * 1000).toLocaleString()), h("td", {}, e.event), h("td", {class: `state-${e.state}`}, e.state || "-"), h("td", {}, e.reason || ""))))));
  const pick = k => t.history.map(x => [x.epoch, x[k] ?? null]);
  lineChart(acc, [{name: "val", points: pick("val_acc")}, {name: "train", points: pick("train_acc")}, {name: "ema val", points: pick("ema_val_acc"), dashed: true}], {title: "accuracy (val, train, EMA val)", width: 380});
  lineChart(loss, [{name: "train", points: pick("train_loss")}, {name: "val", points: pick("val_loss")}], {title: "loss (train, val; log)", ylog: true, width: 380});
  lineChart(ratio, layers.map(l => ({name: l, points: t.history.map(x => [x.epoch, (x.update_ratio || {})[l] ?? null])})), {title: "update/weight ratio per layer (log; ~1e-3 is healthy)", ylog: true, width: 380});
  lineChart(trace, [{name: "minibatch loss", points: t.loss_trace}], {title: "minibatch loss by iteration (log)", ylog: true, width: 380});
  document.getElementById("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

// routing and polling ------------------------------------------------------------------------------------------
const route = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
async function refresh() {
  try {
    if (route[0] === "e" && route[2] === "trials") await trialPage(route[1], route[3]);
    else if (route[0] === "e") await experimentPage(route[1]);
    else await listPage();
  } catch (err) {
    document.getElementById("status").textContent = `update failed: ${err.message}`;
  }
}
(async () => {
  settings = await getJSON("/api/config");
  const every = parseFloat(params.get("refresh") || "0") * 1000 || settings.refresh_ms;
  await refresh();
  setInterval(refresh, every);
})();
