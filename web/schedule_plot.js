// Plot of noise schedules from GET /ldm/schedule, on a 2D canvas.
// Imports nothing (in particular nothing from ComfyUI), so a browser test can load it alone.
// No schedule formula lives here: every number drawn comes from the route (core/schedule.py).

export const SCHEDULE_ROUTE = "/ldm/schedule";

// y-axis quantities: the route's curve key, the key of each step's marker value, the axis.
export const QUANTITIES = {
  log_snr: { label: "log-SNR  λ = log(ᾱ / (1 − ᾱ))", short: "log-SNR", curve: "log_snr", marker: "log_snr", log: false },
  alpha_bar: { label: "ᾱ (alpha_bar)", short: "alpha_bar", curve: "alpha_bar", marker: "alpha_bar", log: false, fixed: [0, 1] },
  sigma: { label: "σ = √((1 − ᾱ) / ᾱ)  (log axis)", short: "sigma", curve: "sigma", marker: "sigmas", log: true },
};

export const SERIES_COLORS = ["#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#4db6ac", "#f06292"];

const STYLE = {
  background: "#1b1b1b",
  grid: "#2e2e2e",
  axis: "#8a8a8a",
  text: "#d8d8d8",
  error: "#ff8a80",
  font: "11px sans-serif",
};

/** The query string of GET /ldm/schedule for {beta_schedule, steps, spacing, zero_terminal_snr, ckpt_name?, num_timesteps?}. */
export function scheduleQuery(params) {
  const q = new URLSearchParams();
  for (const key of ["beta_schedule", "steps", "spacing", "zero_terminal_snr", "ckpt_name", "num_timesteps"]) {
    const value = params[key];
    if (value === undefined || value === null || value === "") continue;
    q.set(key, typeof value === "boolean" ? (value ? "true" : "false") : String(value));
  }
  return `${SCHEDULE_ROUTE}?${q.toString()}`;
}

function niceStep(range, count) {
  const raw = range / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const f = raw / mag;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
}

/** Linear ticks covering [lo, hi]: {lo, hi, ticks} with lo/hi widened to whole steps. */
export function linearTicks(lo, hi, count = 5) {
  if (!(hi > lo)) {
    const pad = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1;
    lo -= pad;
    hi += pad;
  }
  const step = niceStep(hi - lo, count);
  const start = Math.floor(lo / step + 1e-9) * step;
  const end = Math.ceil(hi / step - 1e-9) * step;
  const ticks = [];
  for (let v = start; v <= end + step * 1e-6; v += step) ticks.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  return { lo: start, hi: end, ticks };
}

/** Decade ticks of a log axis over [lo, hi] (values > 0): {lo, hi, ticks} in data units. */
export function logTicks(lo, hi) {
  let a = Math.floor(Math.log10(lo));
  let b = Math.ceil(Math.log10(hi));
  if (b <= a) b = a + 1;
  const every = Math.max(1, Math.ceil((b - a) / 6));
  const ticks = [];
  for (let k = a; k <= b; k += every) ticks.push(10 ** k);
  return { lo: 10 ** a, hi: 10 ** b, ticks };
}

function formatTick(v, log) {
  if (log) {
    const k = Math.round(Math.log10(v));
    return k >= -2 && k <= 3 ? String(10 ** k >= 1 ? 10 ** k : Number((10 ** k).toFixed(-k))) : `1e${k}`;
  }
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(0);
  return String(Number(v.toPrecision(4)));
}

function isNum(v) {
  return typeof v === "number" && Number.isFinite(v);
}

/** Curve and marker points of one series for a quantity: [{x, y}] with y = null where not plottable. */
function seriesPoints(data, q) {
  const usable = (y) => (isNum(y) && (!q.log || y > 0) ? y : null);
  const xs = Array.isArray(data?.t) ? data.t : [];
  const ys = Array.isArray(data?.[q.curve]) ? data[q.curve] : [];
  const curve = xs.map((x, i) => ({ x, y: usable(ys[i]) })).filter((p) => isNum(p.x));
  const steps = data?.steps ?? {};
  const ts = Array.isArray(steps.timesteps) ? steps.timesteps : [];
  const ms = Array.isArray(steps[q.marker]) ? steps[q.marker] : [];
  const markers = ts.map((x, i) => ({ x, y: usable(ms[i]) })).filter((p) => isNum(p.x));
  return { curve, markers };
}

function setupContext(canvas, options) {
  const ctx = canvas.getContext("2d");
  const scale = options.scale ?? 1;
  ctx.setTransform(scale, 0, 0, scale, 0, 0);
  const width = canvas.width / scale;
  const height = canvas.height / scale;
  ctx.fillStyle = options.background ?? STYLE.background;
  ctx.fillRect(0, 0, width, height);
  ctx.font = options.font ?? STYLE.font;
  return { ctx, width, height };
}

function wrapText(ctx, text, maxWidth) {
  const lines = [];
  for (const paragraph of String(text).split("\n")) {
    let line = "";
    for (const word of paragraph.split(/\s+/)) {
      const next = line ? `${line} ${word}` : word;
      if (line && ctx.measureText(next).width > maxWidth) {
        lines.push(line);
        line = word;
      } else {
        line = next;
      }
    }
    lines.push(line);
  }
  return lines;
}

/** Clear the canvas and show a message (an error from the route, "loading", ...). Returns the number of lines. */
export function drawMessage(canvas, text, options = {}) {
  const { ctx, width, height } = setupContext(canvas, options);
  ctx.fillStyle = options.color ?? STYLE.error;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  const lines = wrapText(ctx, text, width - 24);
  const lineHeight = 15;
  const top = height / 2 - ((lines.length - 1) * lineHeight) / 2;
  lines.forEach((line, i) => ctx.fillText(line, width / 2, top + i * lineHeight));
  return lines.length;
}

/**
 * Draw schedules on a canvas.
 *
 * series: [{label, data, color, error}] where data is GET /ldm/schedule's JSON; a series with
 *   `error` (or no data) gets a legend line with the error and no curve.
 * options: {quantity: "log_snr" | "alpha_bar" | "sigma" (default log_snr), scale: device pixels per
 *   CSS pixel (default 1), background, font, markers: false to hide the step markers}.
 * Curves are drawn against t; the step markers sit at steps.timesteps with the route's per-step
 * value. Null values (infinite, e.g. log-SNR at t = T-1 under zero terminal SNR) and, on the log
 * sigma axis, values <= 0 are clipped: drawn at the edge of the plot nearest the curve's neighbouring
 * finite value.
 *
 * Returns {curves, markers, points, clipped, errors, xRange, yRange, quantity}: how many curves and
 * markers were drawn, curve points drawn (clipped ones included), how many of those were clipped,
 * and how many series were shown as errors.
 */
export function drawSchedule(canvas, series, options = {}) {
  const quantity = options.quantity ?? "log_snr";
  const q = QUANTITIES[quantity];
  if (!q) throw new Error(`unknown quantity ${quantity}; choose one of ${Object.keys(QUANTITIES).join(", ")}`);
  const result = { curves: 0, markers: 0, points: 0, clipped: 0, errors: 0, xRange: null, yRange: null, quantity };

  const entries = (series ?? []).map((s, i) => {
    const color = s.color ?? SERIES_COLORS[i % SERIES_COLORS.length];
    const error = s.error ?? (s.data?.error ? String(s.data.error) : s.data ? null : "no data");
    return { label: s.label ?? `schedule ${i + 1}`, color, error, ...(error ? {} : seriesPoints(s.data, q)) };
  });
  const good = entries.filter((e) => !e.error && e.curve.length > 0);
  result.errors = entries.filter((e) => e.error).length;
  if (good.length === 0) {
    const text = entries.filter((e) => e.error).map((e) => `${e.label}: ${e.error}`).join("\n") || "nothing to plot";
    drawMessage(canvas, text, options);
    return result;
  }

  // Ranges: x over every series' t, y over every finite value (curves and markers).
  let xMax = 1;
  const ys = [];
  for (const e of good) {
    for (const p of e.curve) {
      xMax = Math.max(xMax, p.x);
      if (p.y !== null) ys.push(p.y);
    }
    for (const p of e.markers) if (p.y !== null) ys.push(p.y);
  }
  if (ys.length === 0) ys.push(q.log ? 1 : 0);
  let yMin = Math.min(...ys);
  let yMax = Math.max(...ys);
  if (q.fixed) [yMin, yMax] = [Math.min(q.fixed[0], yMin), Math.max(q.fixed[1], yMax)];
  const yt = q.log ? logTicks(yMin, yMax) : q.fixed ? linearTicks(yMin, yMax, 5) : linearTicks(yMin, yMax, 6);
  const xt = linearTicks(0, xMax, 5);
  result.xRange = [xt.lo, xt.hi];
  result.yRange = [yt.lo, yt.hi];

  const { ctx, width, height } = setupContext(canvas, options);
  const plot = { left: 58, top: 10, right: width - 12, bottom: height - 34 };
  if (plot.right - plot.left < 40 || plot.bottom - plot.top < 30) {
    drawMessage(canvas, "too small", options);
    return result;
  }
  const fy = q.log ? (v) => Math.log10(v) : (v) => v;
  const [fyLo, fyHi] = [fy(yt.lo), fy(yt.hi)];
  const X = (x) => plot.left + ((x - xt.lo) / (xt.hi - xt.lo)) * (plot.right - plot.left);
  const Y = (y) => plot.bottom - ((fy(y) - fyLo) / (fyHi - fyLo)) * (plot.bottom - plot.top);
  const mid = (fyLo + fyHi) / 2;

  // Grid, ticks and labels.
  ctx.lineWidth = 1;
  ctx.strokeStyle = STYLE.grid;
  ctx.fillStyle = STYLE.text;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const v of yt.ticks) {
    const y = Math.round(Y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(plot.left, y);
    ctx.lineTo(plot.right, y);
    ctx.stroke();
    ctx.fillText(formatTick(v, q.log), plot.left - 5, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const v of xt.ticks) {
    const x = Math.round(X(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(x, plot.top);
    ctx.lineTo(x, plot.bottom);
    ctx.stroke();
    ctx.fillText(formatTick(v, false), x, plot.bottom + 4);
  }
  ctx.fillText("t (training timestep)", (plot.left + plot.right) / 2, plot.bottom + 18);
  ctx.strokeStyle = STYLE.axis;
  ctx.strokeRect(plot.left + 0.5, plot.top + 0.5, plot.right - plot.left, plot.bottom - plot.top);
  ctx.save();
  ctx.translate(12, (plot.top + plot.bottom) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textBaseline = "middle";
  ctx.fillText(q.label, 0, 0);
  ctx.restore();

  // Curves (clipped to the plot) and step markers.
  ctx.save();
  ctx.beginPath();
  ctx.rect(plot.left, plot.top, plot.right - plot.left, plot.bottom - plot.top);
  ctx.clip();
  for (const e of good) {
    const pts = e.curve;
    ctx.beginPath();
    let drawn = 0;
    pts.forEach((p, i) => {
      let py;
      if (p.y === null) {
        let j = i - 1;
        while (j >= 0 && pts[j].y === null) j--;
        if (j < 0) for (j = i + 1; j < pts.length && pts[j].y === null; j++);
        const neighbour = j >= 0 && j < pts.length ? pts[j].y : null;
        py = neighbour !== null && fy(neighbour) >= mid ? plot.top : plot.bottom;
        result.clipped++;
      } else {
        py = Y(p.y);
      }
      if (drawn === 0) ctx.moveTo(X(p.x), py);
      else ctx.lineTo(X(p.x), py);
      drawn++;
    });
    ctx.strokeStyle = e.color;
    ctx.lineWidth = 2;
    ctx.stroke();
    result.points += drawn;
    if (drawn >= 2) result.curves++;
  }
  if (options.markers !== false) {
    for (const e of good) {
      ctx.fillStyle = e.color;
      ctx.strokeStyle = STYLE.background;
      ctx.lineWidth = 1;
      for (const p of e.markers) {
        if (p.y === null) continue;
        ctx.beginPath();
        ctx.arc(X(p.x), Y(p.y), 3.5, 0, 2 * Math.PI);
        ctx.fill();
        ctx.stroke();
        result.markers++;
      }
    }
  }
  ctx.restore();

  // Legend, top right inside the plot.
  const rows = entries.map((e) => ({
    color: e.color,
    text: e.error ? `${e.label}: ${e.error}` : `${e.label} (${e.markers.length} steps)`,
    error: !!e.error,
  }));
  const maxText = Math.max(60, (plot.right - plot.left) * 0.7);
  const clip = (t) => {
    if (ctx.measureText(t).width <= maxText) return t;
    while (t.length > 1 && ctx.measureText(`${t}…`).width > maxText) t = t.slice(0, -1);
    return `${t}…`;
  };
  const texts = rows.map((r) => clip(r.text));
  const boxW = Math.max(...texts.map((t) => ctx.measureText(t).width)) + 30;
  const boxH = rows.length * 14 + 6;
  const bx = plot.right - boxW - 6;
  const by = plot.top + 6;
  ctx.globalAlpha = 0.85;
  ctx.fillStyle = STYLE.background;
  ctx.fillRect(bx, by, boxW, boxH);
  ctx.globalAlpha = 1;
  ctx.strokeStyle = STYLE.grid;
  ctx.strokeRect(bx + 0.5, by + 0.5, boxW, boxH);
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  rows.forEach((r, i) => {
    const y = by + 10 + i * 14;
    ctx.strokeStyle = r.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(bx + 5, y);
    ctx.lineTo(bx + 20, y);
    ctx.stroke();
    ctx.fillStyle = r.error ? STYLE.error : STYLE.text;
    ctx.fillText(texts[i], bx + 25, y);
  });
  return result;
}
