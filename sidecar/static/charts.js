// Two small SVG charts for the status page: a bucket histogram and a sparkline.
// Hand-written so the page needs no library, no build step and no network; each draw replaces
// the SVG's content at the element's current pixel size, so text stays legible on a phone.

const SVG_NS = "http://www.w3.org/2000/svg";

function el(name, attributes, text) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function size(svg, fallbackHeight) {
  const width = Math.max(200, Math.floor(svg.clientWidth || svg.parentElement.clientWidth));
  const height = Math.floor(svg.clientHeight || fallbackHeight);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  return { width, height };
}

const MIN_BUCKETS = 10;

// The buckets worth showing: every non-empty one, the bucket that holds the threshold (so its
// line is always on the chart), and empty neighbours for context, at least MIN_BUCKETS in all.
function visibleRange(counts, edges, threshold) {
  let first = counts.findIndex((count) => count > 0);
  let last = counts.length - 1 - [...counts].reverse().findIndex((count) => count > 0);
  if (first < 0) [first, last] = [0, 0];
  if (threshold !== undefined) {
    const at = edges.findIndex((edge) => edge >= threshold);
    first = Math.min(first, at);
    last = Math.max(last, at + 1);
  }
  first = Math.max(0, first - 1);
  last = Math.min(counts.length - 1, last + 1);
  while (last - first + 1 < Math.min(MIN_BUCKETS, counts.length)) {
    if (first > 0) first -= 1;
    if (last < counts.length - 1 && last - first + 1 < MIN_BUCKETS) last += 1;
  }
  return [first, last];
}

// histogram: {edges, counts} as /stats gives it (counts[i] is (edges[i-1], edges[i]], the
// last one above every edge). format(seconds) labels an edge; threshold: {value, label}.
export function drawHistogram(svg, histogram, { format, threshold } = {}) {
  const { width, height } = size(svg, 180);
  const { edges, counts } = histogram;
  const [from, to] = visibleRange(counts, edges, threshold?.value);
  const shown = counts.slice(from, to + 1);
  const pad = { left: 8, right: 28, top: 22, bottom: 34 };
  const plotWidth = width - pad.left - pad.right;
  const plotHeight = height - pad.top - pad.bottom;
  const step = plotWidth / shown.length;
  const max = Math.max(1, ...shown);
  const total = counts.reduce((sum, count) => sum + count, 0);

  svg.append(el("line", {
    class: "axis", x1: pad.left, x2: width - pad.right,
    y1: pad.top + plotHeight, y2: pad.top + plotHeight,
  }));
  shown.forEach((count, offset) => {
    const index = from + offset;
    const barHeight = (count / max) * plotHeight;
    const bar = el("rect", {
      class: "bar", x: pad.left + offset * step + 1, width: Math.max(1, step - 2),
      y: pad.top + plotHeight - barHeight, height: barHeight,
      "data-count": count,
    });
    const lower = index === 0 ? "0" : format(edges[index - 1]);
    const upper = index < edges.length ? format(edges[index]) : "∞";
    bar.append(el("title", {}, `${lower} – ${upper}: ${count}`));
    svg.append(bar);
  });
  // Edge labels under the boundaries, as many as fit without overlapping.
  const every = Math.max(1, Math.ceil(56 / step));
  for (let offset = 0; offset < shown.length; offset += every) {
    const index = from + offset;
    if (index >= edges.length) break;
    svg.append(el("text", {
      class: "tick", x: pad.left + (offset + 1) * step, y: height - pad.bottom + 14,
      "text-anchor": "middle",
    }, format(edges[index])));
  }
  svg.append(el("text", { class: "tick", x: pad.left, y: 14 },
    total ? `${total.toLocaleString("en-US")} observed, tallest ${max.toLocaleString("en-US")}`
      : "nothing observed yet"));

  if (threshold !== undefined) {
    const index = edges.findIndex((edge) => edge >= threshold.value);
    const lower = index === 0 ? 0 : edges[index - 1];
    const within = (threshold.value - lower) / (edges[index] - lower);
    const x = pad.left + (index - from + within) * step;
    svg.append(el("line", {
      class: "threshold", x1: x, x2: x, y1: pad.top - 4, y2: pad.top + plotHeight,
    }));
    const anchor = x > width - 90 ? "end" : "start";
    svg.append(el("text", {
      class: "threshold-label", x: anchor === "end" ? x - 4 : x + 4, y: pad.top + 8,
      "text-anchor": anchor,
    }, threshold.label));
  }
  svg.append(el("text", { class: "tick", x: width - pad.right, y: height - 4, "text-anchor": "end" },
    "upper bucket edge"));
}

// points: [{t: ms, v: number}], oldest first; drawn over at most the last `maxSpanMs`, and
// over as long as there are points for until then, so a page just opened fills the width.
export function drawSparkline(svg, points, maxSpanMs) {
  const { width, height } = size(svg, 44);
  if (points.length < 2) return;
  const now = points[points.length - 1].t;
  const spanMs = Math.min(maxSpanMs, now - points[0].t);
  const max = Math.max(...points.map((point) => point.v)) || 1;
  const x = (t) => width - ((now - t) / spanMs) * width;
  const y = (v) => height - 2 - (v / max) * (height - 4);
  const line = points.map((point, i) => `${i ? "L" : "M"}${x(point.t).toFixed(1)},${y(point.v).toFixed(1)}`).join("");
  const area = `${line}L${x(now).toFixed(1)},${height}L${x(points[0].t).toFixed(1)},${height}Z`;
  svg.append(el("path", { class: "spark-area", d: area }));
  svg.append(el("path", { class: "spark-line", d: line }));
}
