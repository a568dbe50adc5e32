/**
 * A small SVG chart generator for the benchmark documents (no dependencies): one or more panels side by
 * side under a title, each with axes, tick labels, axis titles and a legend.
 *
 * A panel's x axis is either
 *   "log2"      numeric values placed on a log2 scale (size and depth sweeps), each series a line with
 *               markers; or
 *   "category"  evenly spaced labels, each series a bar in every group.
 * The y axis is linear from 0 with "nice" ticks (1, 2, 5 × 10^k). A missing value (null) leaves a gap.
 * The chart has a white background so that it reads the same on light and dark pages.
 */

export interface ChartSeries {
  label: string;
  /** One value per panel x (same order); null: not measured. */
  values: (number | null)[];
}

export interface ChartPanel {
  title: string;
  xTitle: string;
  yTitle: string;
  x: "log2" | "category";
  /** The x positions: `value` places it on a log2 axis (ignored for categories), `label` is printed. */
  xs: { value: number; label: string }[];
  series: ChartSeries[];
}

const PANEL_WIDTH = 440;
const PLOT_HEIGHT = 220;
const MARGIN = { left: 64, right: 20, top: 34, bottom: 46 };
const LEGEND_LINE = 16;
const TITLE_HEIGHT = 30;
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

/** The chart as an SVG document. */
export function svgChart(title: string, panels: ChartPanel[]): string {
  const legendLines = Math.max(...panels.map((panel) => panel.series.length));
  const panelHeight = MARGIN.top + PLOT_HEIGHT + MARGIN.bottom + legendLines * LEGEND_LINE + 8;
  const width = PANEL_WIDTH * panels.length;
  const height = TITLE_HEIGHT + panelHeight;
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}"` +
      ` font-family="Helvetica, Arial, sans-serif" font-size="11">`,
    `<rect width="${width}" height="${height}" fill="#fff"/>`,
    text(width / 2, 20, title, { size: 14, anchor: "middle", weight: "bold" }),
    ...panels.map((panel, i) => renderPanel(panel, i * PANEL_WIDTH, TITLE_HEIGHT)),
    "</svg>",
  ];
  return parts.join("\n") + "\n";
}

function renderPanel(panel: ChartPanel, left: number, top: number): string {
  const x0 = left + MARGIN.left;
  const x1 = left + PANEL_WIDTH - MARGIN.right;
  const y0 = top + MARGIN.top + PLOT_HEIGHT; // the x axis
  const y1 = top + MARGIN.top;
  const values = panel.series.flatMap((s) => s.values).filter((v): v is number => v !== null);
  const { max, step } = niceScale(Math.max(0, ...values));
  const yOf = (v: number): number => y0 - (v / max) * (y0 - y1);
  const out: string[] = [text(left + PANEL_WIDTH / 2, top + 16, panel.title, { size: 12, anchor: "middle" })];

  // Grid and y ticks.
  for (let v = 0; v <= max + step / 2; v += step) {
    const y = yOf(v);
    out.push(line(x0, y, x1, y, v === 0 ? "#333" : "#e5e5e5"));
    out.push(text(x0 - 6, y + 4, formatTick(v), { anchor: "end" }));
  }
  out.push(line(x0, y0, x0, y1, "#333"));
  const yMid = (y0 + y1) / 2;
  out.push(text(left + 14, yMid, panel.yTitle, { anchor: "middle", rotate: true }));
  out.push(text((x0 + x1) / 2, y0 + 34, panel.xTitle, { anchor: "middle" }));

  // The x positions.
  const n = panel.xs.length;
  let xOf: (i: number) => number;
  if (panel.x === "log2") {
    const logs = panel.xs.map((x) => Math.log2(x.value));
    const lo = Math.min(...logs) - 0.4;
    const hi = Math.max(...logs) + 0.4;
    xOf = (i) => x0 + (((logs[i] as number) - lo) / (hi - lo || 1)) * (x1 - x0);
  } else {
    xOf = (i) => x0 + ((i + 0.5) / n) * (x1 - x0);
  }
  panel.xs.forEach((x, i) => {
    out.push(line(xOf(i), y0, xOf(i), y0 + 4, "#333"));
    out.push(text(xOf(i), y0 + 16, x.label, { anchor: "middle" }));
  });

  // The data.
  const groupWidth = ((x1 - x0) / n) * 0.7;
  const barWidth = groupWidth / Math.max(1, panel.series.length);
  panel.series.forEach((series, s) => {
    const color = COLORS[s % COLORS.length] as string;
    if (panel.x === "category") {
      series.values.forEach((v, i) => {
        if (v === null) return;
        const x = xOf(i) - groupWidth / 2 + s * barWidth;
        const h = y0 - yOf(v);
        out.push(
          `<rect x="${r(x)}" y="${r(y0 - h)}" width="${r(barWidth - 1)}" height="${r(h)}" fill="${color}"/>`,
        );
      });
      return;
    }
    let path = "";
    series.values.forEach((v, i) => {
      if (v === null) {
        path += " "; // a gap: the next point starts a new segment
        return;
      }
      path += `${path === "" || path.endsWith(" ") ? "M" : "L"}${r(xOf(i))},${r(yOf(v))}`;
      out.push(`<circle cx="${r(xOf(i))}" cy="${r(yOf(v))}" r="3" fill="${color}"/>`);
    });
    if (path.trim()) out.push(`<path d="${path.trim()}" fill="none" stroke="${color}" stroke-width="2"/>`);
  });

  // The legend, one series a line under the x axis title.
  panel.series.forEach((series, s) => {
    const y = y0 + MARGIN.bottom + s * LEGEND_LINE + 4;
    const color = COLORS[s % COLORS.length] as string;
    out.push(`<rect x="${r(x0)}" y="${r(y - 9)}" width="14" height="10" fill="${color}"/>`);
    out.push(text(x0 + 20, y, series.label, {}));
  });
  return out.join("\n");
}

/** A y axis from 0 to a multiple of a 1/2/5 step at or above `maxValue`, with 4–8 steps. */
export function niceScale(maxValue: number): { max: number; step: number } {
  if (!(maxValue > 0)) return { max: 1, step: 0.2 };
  const rough = maxValue / 5;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const step = ([1, 2, 5, 10].find((m) => m * magnitude >= rough) as number) * magnitude;
  return { max: Math.ceil(maxValue / step - 1e-9) * step, step };
}

/** 1500 → "1.5k", 2000000 → "2M", 0.25 → "0.25". */
export function formatTick(v: number): string {
  const trim = (x: number): string => String(Number(x.toPrecision(3)));
  if (v >= 1e6) return `${trim(v / 1e6)}M`;
  if (v >= 1e3) return `${trim(v / 1e3)}k`;
  return trim(v);
}

function r(v: number): string {
  return v.toFixed(1);
}

function line(xa: number, ya: number, xb: number, yb: number, color: string): string {
  return `<line x1="${r(xa)}" y1="${r(ya)}" x2="${r(xb)}" y2="${r(yb)}" stroke="${color}" stroke-width="1"/>`;
}

function text(
  x: number,
  y: number,
  content: string,
  style: { size?: number; anchor?: "start" | "middle" | "end"; weight?: string; rotate?: boolean },
): string {
  const attributes = [`x="${r(x)}"`, `y="${r(y)}"`];
  if (style.size) attributes.push(`font-size="${style.size}"`);
  if (style.anchor && style.anchor !== "start") attributes.push(`text-anchor="${style.anchor}"`);
  if (style.weight) attributes.push(`font-weight="${style.weight}"`);
  if (style.rotate) attributes.push(`transform="rotate(-90 ${r(x)} ${r(y)})"`);
  return `<text ${attributes.join(" ")} fill="#222">${escape(content)}</text>`;
}

function escape(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}
