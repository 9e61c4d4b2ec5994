// A small line chart drawn as inline SVG: several series, linear or log y axis, a hover read-out.
// No library: the dashboard must work offline, served by the app alone.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) node.setAttribute(k, v);
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// 1, 2, 5 × 10^k steps giving about `count` ticks over [lo, hi].
function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

// Ticks for a log axis over [lo, hi] (both > 0): decades, or 1-2-5 within them when the range is short.
function logTicks(lo, hi) {
  const out = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
    for (const m of (Math.log10(hi / lo) < 2 ? [1, 2, 5] : [1])) {
      const t = m * 10 ** e;
      if (t >= lo * 0.999 && t <= hi * 1.001) out.push(t);
    }
  }
  return out.length >= 2 ? out : niceTicks(lo, hi, 4).filter((t) => t > 0);
}

function tickLabel(t) {
  const a = Math.abs(t);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return t.toExponential(0).replace("e+", "e");
  return String(+t.toPrecision(4));
}

class LineChart {
  constructor({ title, yLabel, log = false, width = 640, height = 260 }) {
    this.title = title; this.yLabel = yLabel; this.log = log;
    this.width = width; this.height = height; this.series = [];
    this.margin = { left: 58, right: 14, top: 10, bottom: 34 };
    this.svg = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title });
    this.legend = el("div", { class: "legend muted" });
    this.readout = el("div", { class: "muted readout" }, "\u00a0");
    this.node = el("div", { class: "chart card", "data-chart": yLabel }, el("h2", {}, title), this.svg, this.legend, this.readout);
    this.svg.addEventListener("mousemove", (e) => this.hover(e));
    this.svg.addEventListener("mouseleave", () => { this.readout.textContent = "\u00a0"; this.cursor && this.cursor.remove(); });
    this.render();
  }

  setSeries(series) { this.series = series; this.render(); }
  setLog(on) { this.log = on; this.render(); }

  // The points drawn: on a log axis only y > 0 (a zero learning rate at the end of a schedule is dropped).
  visible(s) { return s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!this.log || y > 0)); }

  domain() {
    const pts = this.series.flatMap((s) => this.visible(s));
    if (!pts.length) return null;
    let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (this.log) {
      const [l0, l1] = [Math.log10(y0), Math.log10(y1)];
      const pad = Math.max((l1 - l0) * 0.06, 0.05);
      [y0, y1] = [10 ** (l0 - pad), 10 ** (l1 + pad)];
    } else {
      const pad = (y1 - y0) * 0.06 || Math.abs(y0) * 0.1 || 1;
      [y0, y1] = [y0 - pad, y1 + pad];
      if (y0 < 0 && Math.min(...pts.map((p) => p[1])) >= 0) y0 = 0;
    }
    return { x0, x1, y0, y1 };
  }

  scales(d) {
    const { left, right, top, bottom } = this.margin;
    const w = this.width - left - right, h = this.height - top - bottom;
    const fy = this.log ? (y) => (Math.log10(y) - Math.log10(d.y0)) / (Math.log10(d.y1) - Math.log10(d.y0)) : (y) => (y - d.y0) / (d.y1 - d.y0);
    return { x: (x) => left + ((x - d.x0) / (d.x1 - d.x0)) * w, y: (y) => top + h - fy(y) * h, w, h };
  }

  render() {
    const total = this.series.reduce((n, s) => n + this.visible(s).length, 0);
    this.svg.dataset.points = total;
    this.svg.dataset.lastStep = Math.max(0, ...this.series.flatMap((s) => this.visible(s).map((p) => p[0])));
    this.svg.replaceChildren();
    const d = this.domain();
    if (!d) {
      this.svg.append(svg("text", { x: this.width / 2, y: this.height / 2, "text-anchor": "middle", class: "empty" }, "no points yet"));
      this.legend.replaceChildren();
      return;
    }
    const s = this.scales(d);
    const { left, top } = this.margin;
    const grid = svg("g", { class: "grid" }), axis = svg("g", { class: "axis" });
    for (const t of niceTicks(d.x0, d.x1, 6)) {
      if (t < d.x0 || t > d.x1) continue;
      grid.append(svg("line", { x1: s.x(t), x2: s.x(t), y1: top, y2: top + s.h }));
      axis.append(svg("text", { x: s.x(t), y: top + s.h + 15, "text-anchor": "middle" }, tickLabel(t)));
    }
    for (const t of this.log ? logTicks(d.y0, d.y1) : niceTicks(d.y0, d.y1, 5)) {
      if (t < d.y0 || t > d.y1) continue;
      grid.append(svg("line", { x1: left, x2: left + s.w, y1: s.y(t), y2: s.y(t) }));
      axis.append(svg("text", { x: left - 6, y: s.y(t) + 4, "text-anchor": "end" }, tickLabel(t)));
    }
    axis.append(svg("text", { x: left + s.w / 2, y: this.height - 4, "text-anchor": "middle" }, "optimizer step"));
    axis.append(svg("text", { x: 12, y: top + s.h / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${top + s.h / 2})` },
      this.yLabel + (this.log ? " (log)" : "")));
    axis.append(svg("line", { x1: left, x2: left, y1: top, y2: top + s.h, stroke: "#c4c9d2" }));
    axis.append(svg("line", { x1: left, x2: left + s.w, y1: top + s.h, y2: top + s.h, stroke: "#c4c9d2" }));
    this.svg.append(grid, axis);
    for (const series of this.series) this.svg.append(this.drawSeries(series, s));
    this.legend.replaceChildren(...this.legendItems());
  }

  drawSeries(series, s) {
    const pts = this.visible(series).sort((a, b) => a[0] - b[0]);
    const g = svg("g", { class: "series", "data-run": series.run || series.name, "data-name": series.name, "data-n": pts.length });
    if (pts.length > 1) {
      g.append(svg("polyline", { points: pts.map(([x, y]) => `${s.x(x).toFixed(1)},${s.y(y).toFixed(1)}`).join(" "),
        fill: "none", stroke: series.color, "stroke-width": 1.8, "stroke-dasharray": series.dash || null, "stroke-linejoin": "round" }));
    }
    if (series.markers || pts.length === 1) {
      for (const [x, y] of pts) g.append(svg("circle", { cx: s.x(x), cy: s.y(y), r: 3, fill: series.color }, svg("title", {}, `${series.name}: step ${x}, ${tickLabel(y)}`)));
    }
    return g;
  }

  legendItems() {
    const seen = new Map();
    for (const s of this.series) if (!seen.has(s.run || s.name) && s.points.length) seen.set(s.run || s.name, s.color);
    return [...seen].map(([name, color]) => el("span", { style: "margin-right:14px" }, el("span", { class: "swatch", style: `background:${color}` }), name));
  }

  // The values at the step nearest the pointer, one per series.
  hover(event) {
    const d = this.domain();
    if (!d) return;
    const box = this.svg.getBoundingClientRect();
    const s = this.scales(d);
    const px = ((event.clientX - box.left) / box.width) * this.width;
    const step = d.x0 + ((px - this.margin.left) / s.w) * (d.x1 - d.x0);
    const parts = [];
    let at = null;
    for (const series of this.series) {
      const pts = this.visible(series);
      if (!pts.length) continue;
      const near = pts.reduce((a, b) => (Math.abs(b[0] - step) < Math.abs(a[0] - step) ? b : a));
      at = at === null || Math.abs(near[0] - step) < Math.abs(at - step) ? near[0] : at;
      parts.push(`${series.name} ${tickLabel(near[1])} @${near[0]}`);
    }
    if (at === null) return;
    this.cursor && this.cursor.remove();
    this.cursor = svg("line", { x1: s.x(at), x2: s.x(at), y1: this.margin.top, y2: this.margin.top + s.h, stroke: "#98a2b3", "stroke-dasharray": "3 3" });
    this.svg.append(this.cursor);
    this.readout.textContent = parts.join("   ·   ");
  }
}
