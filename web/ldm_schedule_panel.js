// ComfyUI extension: a schedule plot on every LDMNoiseSchedule node.
// The numbers come from GET /ldm/schedule (nodes/routes.py -> core/schedule.py); drawing is in ./schedule_plot.js.
// The plot widget is not serialised: saved workflows and prompts are the same with or without it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { QUANTITIES, SERIES_COLORS, drawMessage, drawSchedule, scheduleQuery } from "./schedule_plot.js";

const SCHEDULE_NODE = "LDMNoiseSchedule";
const LOADER_NODE = "LDMLoadModel";
const PARAMS = ["beta_schedule", "steps", "spacing", "zero_terminal_snr"];
const PLOT_WIDGET = "schedule_plot";
const DEBOUNCE_MS = 200;
const PLOT_HEIGHT = 230;
const CACHE_SIZE = 64;

const panels = new Set(); // every live panel: a change anywhere lets each one check what it depends on
const responses = new Map(); // url -> Promise of {data} or {error}; a small LRU of answers only

function typeOf(node) {
  return node?.comfyClass ?? node?.type;
}

function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

/** The node linked to `node`'s input `name`, through legacy Reroute nodes. */
function linkedNode(node, name) {
  const slot = node.inputs?.findIndex((input) => input.name === name) ?? -1;
  if (slot < 0 || node.inputs[slot].link == null) return null;
  let source = node.getInputNode?.(slot) ?? null;
  for (let hops = 0; source && typeOf(source) === "Reroute" && hops < 32; hops++) {
    source = source.getInputNode?.(0) ?? null;
  }
  return source;
}

/** The GET /ldm/schedule parameters of a schedule node's current widgets and model link. */
function nodeParams(node) {
  const params = Object.fromEntries(PARAMS.map((name) => [name, widgetValue(node, name)]));
  const loader = linkedNode(node, "model");
  // The linked model's file: its schedule for `model`, its number of timesteps for the others.
  if (loader && typeOf(loader) === LOADER_NODE) params.ckpt_name = widgetValue(loader, "ckpt_name");
  return params;
}

async function fetchSchedule(url) {
  if (responses.has(url)) {
    const hit = responses.get(url);
    responses.delete(url);
    responses.set(url, hit);
    return hit;
  }
  const pending = (async () => {
    try {
      const response = await api.fetchApi(url);
      const body = await response.json().catch(() => null);
      if (!response.ok) return { error: body?.error ?? `HTTP ${response.status}` };
      return { data: body };
    } catch (e) {
      return { error: `cannot reach ${url}: ${e?.message ?? e}` };
    }
  })();
  responses.set(url, pending);
  while (responses.size > CACHE_SIZE) responses.delete(responses.keys().next().value);
  const result = await pending;
  if (result.error) responses.delete(url); // only answers are cached: a missing model file may appear later
  return result;
}

/** "#id betas spacing steps", with the file's betas for `model` once the route has named them. */
function nodeLabel(node, data = null) {
  const p = nodeParams(node);
  const betas = p.beta_schedule === "model" && data ? `model=${data.beta_schedule}` : p.beta_schedule;
  return `#${node.id} ${betas}${p.zero_terminal_snr ? "+zsnr" : ""} ${p.spacing} ${p.steps}`;
}

/** The schedule nodes of a node's graph (the subgraph it sits in, else the root graph). */
function scheduleNodes(node) {
  const graph = node.graph ?? app.graph;
  return (graph?.nodes ?? graph?._nodes ?? []).filter((n) => typeOf(n) === SCHEDULE_NODE);
}

class SchedulePanel {
  constructor(node) {
    this.node = node;
    this.quantity = "log_snr";
    this.overlay = false;
    this.timer = null;
    this.force = false;
    this.generation = 0;
    this.lastKey = null;
    this.series = null;
    this.message = "loading…";

    const root = document.createElement("div");
    root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;box-sizing:border-box;";
    const bar = document.createElement("div");
    bar.style.cssText = "display:flex;gap:8px;align-items:center;font:11px sans-serif;color:#ccc;";
    const select = document.createElement("select");
    select.style.cssText = "font:11px sans-serif;";
    for (const [value, q] of Object.entries(QUANTITIES)) select.add(new Option(q.short, value));
    select.value = this.quantity;
    select.addEventListener("change", () => {
      this.quantity = select.value;
      this.draw();
    });
    const overlayLabel = document.createElement("label");
    overlayLabel.style.cssText = "display:flex;gap:3px;align-items:center;cursor:pointer;";
    const overlay = document.createElement("input");
    overlay.type = "checkbox";
    overlay.addEventListener("change", () => {
      this.overlay = overlay.checked;
      this.schedule(true);
    });
    overlayLabel.append(overlay, document.createTextNode("overlay other schedule nodes"));
    bar.append(select, overlayLabel);
    const canvas = document.createElement("canvas");
    canvas.style.cssText = "width:100%;flex:1 1 auto;min-height:120px;border-radius:4px;";
    root.append(bar, canvas);
    this.canvas = canvas;

    // serialize: false keeps the widget out of the prompt (options) and out of widgets_values (widget).
    // Added after the node's own widgets, so skipping it leaves no hole in the positional widgets_values.
    this.widget = node.addDOMWidget(PLOT_WIDGET, "ldm_schedule_plot", root, {
      serialize: false,
      hideOnZoom: false,
      getValue: () => undefined,
      setValue: () => {},
      getMinHeight: () => PLOT_HEIGHT,
    });
    this.widget.serialize = false;

    if (typeof ResizeObserver === "function") {
      this.resizer = new ResizeObserver(() => this.draw());
      this.resizer.observe(canvas);
    }
    const min = node.computeSize?.() ?? node.size;
    node.setSize?.([Math.max(node.size[0], min[0], 320), Math.max(node.size[1], min[1])]);
  }

  /** What the plot depends on: this node's parameters, and the others' when overlaying. */
  key() {
    const own = JSON.stringify(nodeParams(this.node));
    if (!this.overlay) return own;
    const others = scheduleNodes(this.node).filter((n) => n !== this.node);
    return own + others.map((n) => `|${n.id}:${JSON.stringify(nodeParams(n))}`).join("");
  }

  /** Debounced: after DEBOUNCE_MS without another call, fetch if anything the plot depends on
   * changed (or always, with force). The key is read when the timer fires, so values set after
   * a callback ran are seen. */
  schedule(force = false) {
    this.force ||= force;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      const key = this.key();
      if (!this.force && key === this.lastKey) return;
      this.force = false;
      this.lastKey = key;
      this.load();
    }, DEBOUNCE_MS);
  }

  /** Cheap check, run whenever the node is drawn: schedule a fetch when the key changed. */
  poll() {
    if (this.timer === null && this.key() !== this.lastKey) this.schedule();
  }

  async load() {
    const generation = ++this.generation;
    const nodes = [this.node, ...(this.overlay ? scheduleNodes(this.node).filter((n) => n !== this.node) : [])];
    const results = await Promise.all(nodes.map((n) => fetchSchedule(scheduleQuery(nodeParams(n)))));
    if (generation !== this.generation) return; // a newer request superseded this one
    this.series = nodes.map((n, i) => ({
      label: `${n === this.node ? "this: " : ""}${nodeLabel(n, results[i].data)}`,
      color: SERIES_COLORS[i % SERIES_COLORS.length],
      data: results[i].data ?? null,
      error: results[i].error ?? null,
    }));
    // This node's own error is the message; the others' show as legend lines.
    this.message = results[0].error ?? null;
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    if (!canvas.clientWidth || !canvas.clientHeight) return; // hidden; the ResizeObserver draws when shown
    const scale = window.devicePixelRatio || 1;
    const width = Math.round(canvas.clientWidth * scale);
    const height = Math.round(canvas.clientHeight * scale);
    if (canvas.width !== width) canvas.width = width;
    if (canvas.height !== height) canvas.height = height;
    try {
      if (this.message || !this.series) drawMessage(canvas, this.message ?? "loading…", { scale });
      else drawSchedule(canvas, this.series, { quantity: this.quantity, scale });
    } catch (e) {
      drawMessage(canvas, `plot failed: ${e?.message ?? e}`, { scale });
    }
  }

  remove() {
    clearTimeout(this.timer);
    this.timer = null;
    this.resizer?.disconnect();
    panels.delete(this);
  }
}

/** Something a plot may depend on changed (a widget, a link, a node): every panel checks its key. */
function refreshAll() {
  for (const panel of panels) panel.schedule();
}

function chain(object, method, after) {
  const original = object[method];
  object[method] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

function watchWidgets(node) {
  for (const widget of node.widgets ?? []) {
    if (widget.name === PLOT_WIDGET) continue;
    chain(widget, "callback", refreshAll);
  }
}

function attachPanel(node) {
  if (node.ldmSchedulePanel) return;
  const panel = new SchedulePanel(node);
  node.ldmSchedulePanel = panel;
  panels.add(panel);
  watchWidgets(node);
  chain(node, "onConnectionsChange", refreshAll);
  chain(node, "onConfigure", refreshAll);
  chain(node, "onRemoved", () => {
    panel.remove();
    refreshAll();
  });
  // Values set without a callback (undo, paste, another extension): compare the key when the
  // node is drawn; poll() fetches only when it changed.
  chain(node, "onDrawForeground", () => panel.poll());
  panel.schedule(true);
}

function attachLoader(node) {
  watchWidgets(node);
  chain(node, "onConnectionsChange", refreshAll);
  chain(node, "onRemoved", refreshAll);
}

app.registerExtension({
  name: "ldm_nodes.schedule_panel",
  nodeCreated(node) {
    const type = typeOf(node);
    if (type === SCHEDULE_NODE) attachPanel(node);
    else if (type === LOADER_NODE) attachLoader(node);
  },
  loadedGraphNode(node) {
    node.ldmSchedulePanel?.schedule(true);
  },
});
