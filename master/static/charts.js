// Small hand-written SVG charts (no network, no library): line charts and scatter/strip plots with log axes.
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                 "#bcbd22", "#7f7f7f", "#393b79", "#637939"];

function el(tag, attrs, parent) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function extent(values, log) {
  const v = values.filter(x => x !== null && isFinite(x) && (!log || x > 0));
  if (!v.length) return [0, 1];
  let lo = Math.min(...v), hi = Math.max(...v);
  if (lo === hi) { lo -= log ? lo / 2 : 0.5; hi += log ? hi : 0.5; }
  if (log) return [lo / Math.pow(hi / lo, 0.03), hi * Math.pow(hi / lo, 0.03)];
  return [lo - (hi - lo) * 0.03, hi + (hi - lo) * 0.03];
}

function scale(domain, range, log) {
  const f = log ? Math.log10 : (x => x);
  const [d0, d1] = [f(domain[0]), f(domain[1])];
  return x => range[0] + (f(x) - d0) / (d1 - d0) * (range[1] - range[0]);
}

function ticks(domain, log, n) {
  if (log) {
    const out = [];
    for (let e = Math.floor(Math.log10(domain[0])); e <= Math.ceil(Math.log10(domain[1])); e++) {
      const t = Math.pow(10, e);
      if (t >= domain[0] * 0.999 && t <= domain[1] * 1.001) out.push(t);
    }
    return out.length ? out : [domain[0], domain[1]];
  }
  const raw = (domain[1] - domain[0]) / (n || 4);  // about n steps of 1, 2 or 5 times a power of ten
  if (!(raw > 0) || !isFinite(raw)) return [domain[0]];
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const err = raw / mag, step = mag * (err >= 7.07 ? 10 : err >= 3.16 ? 5 : err >= 1.41 ? 2 : 1);
  const out = [];
  for (let i = Math.ceil(domain[0] / step - 1e-9); i * step <= domain[1] + step * 1e-9; i++) {
    out.push(+(i * step).toPrecision(12));
  }
  return out;
}

function fmt(x) {
  if (x === null || x === undefined) return "-";
  if (typeof x !== "number") return String(x);
  const a = Math.abs(x);
  return (a !== 0 && (a < 1e-2 || a >= 1e4)) ? x.toExponential(0) : +x.toPrecision(3) + "";
}

// Axes in a box; returns {x, y, plot} with the scales and the plot group.
function frame(svg, w, h, xd, yd, opts) {
  const m = {l: 42, r: 8, t: 16, b: 26};
  svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const x = opts.xcat ? null : scale(xd, [m.l, w - m.r], opts.xlog);
  const y = scale(yd, [h - m.b, m.t], opts.ylog);
  const axis = el("g", {class: "axis"}, svg);
  el("line", {x1: m.l, x2: w - m.r, y1: h - m.b, y2: h - m.b}, axis);
  el("line", {x1: m.l, x2: m.l, y1: m.t, y2: h - m.b}, axis);
  for (const t of ticks(yd, opts.ylog, 4)) {
    el("text", {x: m.l - 4, y: y(t) + 3, "text-anchor": "end"}, axis).textContent = fmt(t);
  }
  if (!opts.xcat) for (const t of ticks(xd, opts.xlog, 4)) {
    el("text", {x: x(t), y: h - m.b + 12, "text-anchor": "middle"}, axis).textContent = fmt(t);
  }
  if (opts.title) el("text", {x: m.l, y: 11, "font-weight": "bold"}, svg).textContent = opts.title;
  return {x, y, m, w, h};
}

// series: [{name, points: [[x, y], ...], color, dashed}]
function lineChart(svg, series, opts) {
  svg.replaceChildren();
  const xs = series.flatMap(s => s.points.map(p => p[0])), ys = series.flatMap(s => s.points.map(p => p[1]));
  const f = frame(svg, opts.width || 460, opts.height || 220, extent(xs, false), opts.ydomain || extent(ys, opts.ylog),
                  {ylog: opts.ylog, title: opts.title});
  series.forEach((s, i) => {
    const pts = s.points.filter(p => p[1] !== null && isFinite(p[1]) && (!opts.ylog || p[1] > 0));
    const color = s.color || PALETTE[i % PALETTE.length];
    const d = pts.map((p, j) => `${j ? "L" : "M"}${f.x(p[0]).toFixed(1)},${f.y(p[1]).toFixed(1)}`).join("");
    const path = el("path", {d: d || "M0,0", fill: "none", stroke: color, "stroke-width": s.bold ? 2.2 : 1.4,
                             "stroke-dasharray": s.dashed ? "4 3" : "none", "data-trial": s.name,
                             "data-points": pts.length, class: s.bold ? "curve bold" : "curve"}, svg);
    el("title", {}, path).textContent = s.name;
    for (const p of pts.length < 60 ? pts : []) el("circle", {cx: f.x(p[0]), cy: f.y(p[1]), r: 1.8, fill: color}, svg);
  });
}

// Validation accuracy (y) against one parameter (x): log axis, or a strip plot for a categorical parameter.
function scatterChart(svg, param, acc, colors, opts) {
  svg.replaceChildren();
  const cats = param.categorical ? [...new Set(param.values)].sort() : null;
  const f = frame(svg, opts.width || 300, opts.height || 200, extent(param.values, param.log), extent(acc, false),
                  {xlog: param.log, xcat: !!cats, title: param.name + (param.log ? " (log)" : "")});
  let x = f.x;
  if (cats) {
    const band = (f.w - f.m.l - f.m.r) / cats.length;
    cats.forEach((c, i) => {
      el("text", {x: f.m.l + band * (i + 0.5), y: f.h - f.m.b + 12, "text-anchor": "middle"}, svg).textContent = c;
    });
    x = (v, k) => f.m.l + band * (cats.indexOf(v) + 0.5) + ((k * 7919) % 100 / 100 - 0.5) * band * 0.6;
  }
  for (const flag of param.flags || []) {
    if (cats || flag.best === undefined) continue;
    const fx = x(flag.best);
    const line = el("line", {x1: fx, x2: fx, y1: f.m.t, y2: f.h - f.m.b, stroke: "#c62828", "stroke-dasharray": "3 2",
                             class: "border-flag"}, svg);
    el("title", {}, line).textContent = `border flag (${flag.stage}): best at the ${flag.side} border`;
  }
  const g = el("g", {}, svg);
  param.values.forEach((v, k) => {
    if (acc[k] === null || v === null || (param.log && v <= 0)) return;
    el("circle", {cx: (cats ? x(v, k) : x(v)).toFixed(1), cy: f.y(acc[k]).toFixed(1), r: 2.2, fill: colors[k],
                  "fill-opacity": 0.6}, g);
  });
  if ((param.flags || []).length) {
    el("text", {x: f.w - f.m.r, y: 11, "text-anchor": "end", class: "flag"}, svg).textContent = "⚑ border";
  }
}
