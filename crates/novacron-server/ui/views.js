// Small DOM helpers shared by the pages: element builder, formatting,
// capacity bars, line charts (SVG), tables and a virtualised list.

/** h("div.card", {onclick}, child, "text", [children]) */
export function h(tag, attrs, ...children) {
  const [name, ...classes] = tag.split(".");
  const el = document.createElement(name || "div");
  if (classes.length) el.className = classes.join(" ");
  if (attrs !== null && attrs !== undefined && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else if (k in el && k !== "list") el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : String(c));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function bytes(n) {
  if (n === undefined || n === null) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}

export function age(t) {
  if (!t) return "-";
  const s = Math.max(0, Math.round((Date.now() - new Date(t).getTime()) / 1000));
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  if (s < 172800) return `${Math.round(s / 3600)}h`;
  return `${Math.round(s / 86400)}d`;
}

export function time(t) {
  return t ? new Date(t).toLocaleString() : "-";
}

export function phaseBadge(phase) {
  return h(`span.badge.phase-${String(phase || "").toLowerCase()}`, phase || "-");
}

/** A bar: used of total, with a label. */
export function bar(label, used, total, fmt = (x) => x) {
  const pct = total > 0 ? Math.min(100, (100 * used) / total) : 0;
  const cls = pct > 90 ? "bar-fill.hot" : pct > 70 ? "bar-fill.warm" : "bar-fill";
  return h(
    "div.bar",
    { title: `${label}: ${fmt(used)} of ${fmt(total)}` },
    h("div.bar-label", `${label} ${fmt(used)} / ${fmt(total)}`),
    h("div.bar-track", h(`div.${cls}`, { style: { width: `${pct.toFixed(1)}%` } })),
  );
}

/** A line chart of [t, value] points (SVG, no library). */
export function lineChart(points, { width = 360, height = 90, fmt = (x) => x.toFixed(1), label = "" } = {}) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "chart");
  if (points.length < 2) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", 8);
    t.setAttribute("y", height / 2);
    t.textContent = `${label}: waiting for samples`;
    svg.append(t);
    return svg;
  }
  const t0 = points[0][0];
  const t1 = points[points.length - 1][0];
  const max = Math.max(...points.map((p) => p[1]), 1e-9);
  const x = (t) => ((t - t0) / Math.max(1, t1 - t0)) * (width - 10) + 5;
  // The top 20 px hold the label.
  const y = (v) => height - 6 - (v / max) * (height - 28);
  const path = document.createElementNS(ns, "polyline");
  path.setAttribute("points", points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "));
  path.setAttribute("fill", "none");
  path.setAttribute("class", "chart-line");
  const text = document.createElementNS(ns, "text");
  text.setAttribute("x", 6);
  text.setAttribute("y", 12);
  text.textContent = `${label}: ${fmt(points[points.length - 1][1])} (max ${fmt(max)})`;
  svg.append(path, text);
  return svg;
}

/** A table: columns [{title, cell: (row) => node|string}]. */
export function table(columns, rows, { onRow, empty = "Nothing here yet" } = {}) {
  if (!rows.length) return h("p.muted", empty);
  return h(
    "table.grid",
    h("thead", h("tr", columns.map((c) => h("th", c.title)))),
    h(
      "tbody",
      rows.map((r) =>
        h("tr", { onclick: onRow ? () => onRow(r) : null, class: onRow ? "link" : null }, columns.map((c) => h("td", c.cell(r)))),
      ),
    ),
  );
}

/**
 * A list that renders only the rows in view: fixed row height, rows built
 * by `row(item)`; `update(items)` replaces the items and keeps the scroll.
 */
export function virtualList({ rowHeight = 34, height = 560, header, row }) {
  const viewport = h("div.vlist", { style: { height: `${height}px` } });
  const spacer = h("div.vlist-spacer");
  const rows = h("div.vlist-rows");
  viewport.append(spacer, rows);
  let items = [];
  const draw = () => {
    const first = Math.max(0, Math.floor(viewport.scrollTop / rowHeight) - 5);
    const count = Math.ceil(height / rowHeight) + 10;
    spacer.style.height = `${items.length * rowHeight}px`;
    rows.style.transform = `translateY(${first * rowHeight}px)`;
    clear(rows, items.slice(first, first + count).map(row));
  };
  viewport.addEventListener("scroll", () => requestAnimationFrame(draw));
  return {
    el: h("div.vlist-wrap", header, viewport),
    update(next) {
      items = next;
      draw();
    },
  };
}

/** A button that runs `action` (async), shows it working and any error. */
export function actionButton(label, action, { cls = "", confirmText } = {}) {
  const b = h(`button${cls ? "." + cls : ""}`, label);
  b.addEventListener("click", async (e) => {
    e.stopPropagation();
    if (confirmText && !confirm(confirmText)) return;
    b.disabled = true;
    const was = b.textContent;
    b.textContent = `${label}…`;
    try {
      await action();
    } catch (err) {
      toast(err.message, "error");
    } finally {
      b.disabled = false;
      b.textContent = was;
    }
  });
  return b;
}

export function toast(message, kind = "info") {
  const t = h(`div.toast.${kind}`, message);
  document.body.append(t);
  setTimeout(() => t.remove(), kind === "error" ? 8000 : 3000);
}

export function field(label, input, hint) {
  return h("label.field", h("span", label), input, hint ? h("small.muted", hint) : null);
}
