// A hand-written SVG line chart: one <circle> per sample, a polyline through them.
import { h, svg } from "../dom";

export interface ChartOpts {
  title: string;
  unit: string;
  /** x: seconds since the epoch; y: the value. */
  points: { x: number; y: number }[];
  /** The y axis' top (default: the largest value, rounded up). */
  yMax?: number;
  testid?: string;
  format?: (y: number) => string;
}

const W = 640;
const H = 220;
const PAD = { l: 52, r: 12, t: 12, b: 28 };

function niceMax(v: number): number {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function timeLabel(sec: number): string {
  const d = new Date(sec * 1000);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function lineChart(o: ChartOpts): HTMLElement {
  const fmt = o.format ?? ((y: number) => `${Math.round(y * 10) / 10}`);
  const pts = o.points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y)).sort((a, b) => a.x - b.x);
  const yMax = o.yMax ?? niceMax(Math.max(0, ...pts.map((p) => p.y)));
  const x0 = pts.length ? pts[0].x : 0;
  const x1 = pts.length ? pts[pts.length - 1].x : 1;
  const span = x1 - x0 || 1;
  const iw = W - PAD.l - PAD.r;
  const ih = H - PAD.t - PAD.b;
  const sx = (x: number) => (pts.length === 1 ? PAD.l + iw / 2 : PAD.l + ((x - x0) / span) * iw);
  const sy = (y: number) => PAD.t + ih - (Math.min(Math.max(y, 0), yMax) / yMax) * ih;

  const chart = svg("svg", {
    viewBox: `0 0 ${W} ${H}`,
    class: "chart",
    role: "img",
    "aria-label": `${o.title}: ${pts.length} samples`,
    preserveAspectRatio: "xMidYMid meet",
    ...(o.testid ? { "data-testid": o.testid } : {}),
  });
  chart.appendChild(svg("title", {}, o.title));
  // grid and y labels
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    const y = sy(v);
    chart.appendChild(svg("line", { x1: PAD.l, x2: W - PAD.r, y1: y, y2: y, class: "chart-grid" }));
    chart.appendChild(svg("text", { x: PAD.l - 6, y: y + 4, class: "chart-label", "text-anchor": "end" }, fmt(v)));
  }
  if (pts.length) {
    chart.appendChild(svg("text", { x: PAD.l, y: H - 8, class: "chart-label", "text-anchor": "start" }, timeLabel(x0)));
    if (pts.length > 1) chart.appendChild(svg("text", { x: W - PAD.r, y: H - 8, class: "chart-label", "text-anchor": "end" }, timeLabel(x1)));
    chart.appendChild(svg("polyline", { points: pts.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" "), class: "chart-line" }));
    for (const p of pts) {
      const c = svg("circle", { cx: sx(p.x).toFixed(1), cy: sy(p.y).toFixed(1), r: 3, class: "chart-point" });
      c.appendChild(svg("title", {}, `${timeLabel(p.x)}: ${fmt(p.y)} ${o.unit}`));
      chart.appendChild(c);
    }
  } else {
    chart.appendChild(svg("text", { x: W / 2, y: H / 2, class: "chart-label", "text-anchor": "middle" }, "no samples yet"));
  }
  const last = pts[pts.length - 1];
  return h(
    "figure",
    { class: "chart-figure" },
    h("figcaption", null, h("strong", null, o.title), last ? ` — now ${fmt(last.y)} ${o.unit}` : ""),
    chart,
  );
}
