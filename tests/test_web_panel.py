"""The JS side: web/schedule_plot.js and web/ldm_schedule_panel.js in headless Chromium, with the
numbers served by the real GET /ldm/schedule, plus cheap static checks of the JS files.

The browser test serves, on 127.0.0.1, what ComfyUI would: web/ as /extensions/ldm_nodes/, the
route under /api/ (as ComfyUI mirrors it), and stand-ins for /scripts/app.js and /scripts/api.js
(the only ComfyUI modules the panel imports). A test page draws two schedules with the plot module,
then drives the panel extension on fake nodes, and writes what it saw into the DOM, which
`chromium --dump-dom` returns. It skips only when no chromium binary is installed (CI installs
Debian's `chromium`).
"""
import asyncio
import base64
import html
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from aiohttp import web

from ldm_nodes.nodes import model_paths, routes
from ldm_nodes.tools.model_files import edited_copy

WEB = Path(__file__).resolve().parents[1] / "web"
PANEL = WEB / "ldm_schedule_panel.js"
PLOT = WEB / "schedule_plot.js"
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-shapes-pixel.safetensors"
COMFY_IMPORTS = {"../../scripts/app.js", "../../scripts/api.js"}
IMPORT = re.compile(r"""(?:\bimport\s*(?:[\w{}*,\s]+from\s*)?|\bimport\s*\(\s*|\bexport\s+[\w{}*,\s]+from\s*)["']([^"']+)["']""")

# --- static checks ---------------------------------------------------------------------------


def imports_of_text(text):
    return IMPORT.findall(text)


def imports_of(path):
    return imports_of_text(path.read_text())


def test_js_files_are_flat_and_import_only_comfy_shims_and_siblings():
    files = sorted(p.relative_to(WEB).as_posix() for p in WEB.rglob("*.js"))
    assert files == ["ldm_schedule_panel.js", "schedule_plot.js"]
    assert imports_of(PLOT) == []  # the drawing module stands alone
    panel = imports_of(PANEL)
    assert set(panel) == COMFY_IMPORTS | {"./schedule_plot.js"}
    for spec in panel:
        assert spec in COMFY_IMPORTS or (spec.startswith("./") and (WEB / spec[2:]).is_file()), spec
    # The pattern sees every form of import, so the checks above can fail.
    assert imports_of_text('import { a } from "/scripts/ui.js"; import("../x.js"); import "./y.js";') == [
        "/scripts/ui.js", "../x.js", "./y.js"]


def test_panel_widget_is_not_serialised_and_extension_is_registered():
    text = PANEL.read_text()
    assert 'name: "ldm_nodes.schedule_panel"' in text and "app.registerExtension(" in text
    call = text[text.index("addDOMWidget("):]
    assert "serialize: false" in call[:call.index("});")]  # kept out of the prompt
    assert "this.widget.serialize = false;" in text  # kept out of the workflow's widgets_values
    assert 'fetchApi(' in text and "/ldm/schedule" in PLOT.read_text()


# --- the browser test ------------------------------------------------------------------------

APP_STUB = """
export const app = {
  extensions: [],
  graph: { nodes: [] },
  registerExtension(extension) {
    if (this.extensions.some((e) => e.name === extension.name)) throw new Error(`Extension named '${extension.name}' already registered.`);
    this.extensions.push(extension);
  },
};
"""

API_STUB = """
export const api = {
  calls: [],
  async fetchApi(route, options) {
    this.calls.push(route);
    return fetch("/api" + route, options);
  },
};
"""

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>pending</title></head>
<body style="margin:0;background:#000">
<pre id="plot">pending</pre>
<pre id="panel">pending</pre>
<script type="module">
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(test, what, ms = 8000) {
  for (let waited = 0; waited < ms; waited += 25) {
    if (test()) return;
    await sleep(25);
  }
  throw new Error(`timed out waiting for ${what}`);
}
function rgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}
function countPixels(canvas, color = null, background = [0, 0, 0], tolerance = 60) {
  const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    const px = [data[i], data[i + 1], data[i + 2]];
    const target = color ?? background;
    const near = Math.abs(px[0] - target[0]) + Math.abs(px[1] - target[1]) + Math.abs(px[2] - target[2]) <= tolerance;
    if (color ? near : !near) n++;
  }
  return n;
}
const report = (id, value) => { document.getElementById(id).textContent = JSON.stringify(value); };

async function plotTest() {
  const plot = await import("/extensions/ldm_nodes/schedule_plot.js");
  const queries = [
    { beta_schedule: "scaled_linear", steps: 20, spacing: "karras", zero_terminal_snr: false },
    { beta_schedule: "cosine", steps: 12, spacing: "trailing", zero_terminal_snr: true },
  ];
  const data = await Promise.all(queries.map((q) => fetch(plot.scheduleQuery(q)).then((r) => r.json())));
  const out = { urls: queries.map(plot.scheduleQuery), draws: {} };
  const red = "#ff0000", blue = "#0000ff";
  for (const quantity of Object.keys(plot.QUANTITIES)) {
    const canvas = document.createElement("canvas");
    canvas.width = 480; canvas.height = 300;
    document.body.append(canvas);
    const series = [{ label: "SD karras", data: data[0], color: red }, { label: "cosine zsnr", data: data[1], color: blue }];
    const result = plot.drawSchedule(canvas, series, { quantity, background: "#000000" });
    const redPixels = countPixels(canvas, rgb(red)), bluePixels = countPixels(canvas, rgb(blue));
    const png = canvas.toDataURL("image/png");
    const bare = plot.drawSchedule(canvas, series, { quantity, background: "#000000", markers: false });
    out.draws[quantity] = { ...result, redPixels, bluePixels, drawnPixels: countPixels(canvas),
                            redWithoutMarkers: countPixels(canvas, rgb(red)), bareMarkers: bare.markers, png };
  }
  const bad = await fetch(plot.scheduleQuery({ beta_schedule: "linear", steps: 0, spacing: "karras" }));
  const badBody = await bad.json();
  const canvas = document.createElement("canvas");
  canvas.width = 300; canvas.height = 120;
  out.error = { status: bad.status, body: badBody,
                result: plot.drawSchedule(canvas, [{ label: "bad", error: badBody.error }], { background: "#000000" }) };
  return out;
}

class FakeNode {
  constructor(graph, id, type, widgets) {
    Object.assign(this, { graph, id, type, comfyClass: type, inputs: [], size: [300, 120], serialize_widgets: true });
    this.widgets = widgets.map(([name, value]) => ({ name, value, type: "combo" }));
    graph.nodes.push(this);
  }
  addDOMWidget(name, type, element, options) {
    element.style.width = "420px";
    element.style.height = "260px";
    document.body.append(element);
    const widget = { name, type, element, options, get value() { return options.getValue?.(); }, set value(v) { options.setValue?.(v); } };
    this.widgets.push(widget);
    return widget;
  }
  computeSize() { return [320, 420]; }
  setSize(size) { this.size = size; }
  getInputNode(slot) {
    const link = this.inputs[slot]?.link;
    return link == null ? null : this.graph.links[link];
  }
  serialize() {  // LiteGraph's sparse positional serializer
    const values = [];
    this.widgets.forEach((w, i) => { if (w.serialize !== false) values[i] = w.value ?? null; });
    return { widgets_values: JSON.parse(JSON.stringify(values)) };
  }
  set(name, value) {
    const widget = this.widgets.find((w) => w.name === name);
    widget.value = value;
    widget.callback?.(value);
  }
}

async function panelTest() {
  const { app } = await import("/scripts/app.js");
  const { api } = await import("/scripts/api.js");
  await import("/extensions/ldm_nodes/ldm_schedule_panel.js");
  const extension = app.extensions.find((e) => e.name === "ldm_nodes.schedule_panel");
  const graph = app.graph;
  graph.links = {};
  const loader = new FakeNode(graph, 1, "LDMLoadModel", [["ckpt_name", "tiny.safetensors"], ["precision", "auto"]]);
  const node = new FakeNode(graph, 2, "LDMNoiseSchedule", [["beta_schedule", "model"], ["steps", 20], ["spacing", "karras"], ["zero_terminal_snr", false]]);
  node.inputs.push({ name: "model", type: "LDM_MODEL", link: 7 });
  graph.links[7] = loader;
  extension.nodeCreated(loader, app);
  extension.nodeCreated(node, app);
  const out = { extensions: app.extensions.map((e) => e.name) };
  const panel = node.ldmSchedulePanel;
  const canvas = panel.canvas;
  const plotWidget = node.widgets.find((w) => w.name === "schedule_plot");
  out.widget = { serialize: plotWidget.serialize, optionSerialize: plotWidget.options.serialize, type: plotWidget.type };
  out.serialized = node.serialize().widgets_values;

  await until(() => api.calls.length >= 1 && panel.series, "the first plot");
  out.png = canvas.toDataURL("image/png");
  out.first = { calls: [...api.calls], message: panel.message, label: panel.series[0].label,
                beta: panel.series[0].data.beta_schedule, T: panel.series[0].data.num_timesteps,
                own: countPixels(canvas, rgb("#4fc3f7"), [27, 27, 27], 40), canvas: [canvas.width, canvas.height] };

  // Three edits 60 ms apart, within the debounce: one fetch, with the last value.
  let before = api.calls.length;
  node.set("steps", 8);
  await sleep(60);
  node.set("steps", 9);
  await sleep(60);
  node.set("steps", 10);
  await until(() => api.calls.length > before && panel.series?.[0].data?.steps.timesteps.length === 10, "steps=10");
  await sleep(600);
  out.debounced = api.calls.slice(before);

  // Another quantity redraws without fetching.
  before = api.calls.length;
  const select = panel.widget.element.querySelector("select");
  select.value = "sigma";
  select.dispatchEvent(new Event("change"));
  await sleep(400);
  out.quantityFetches = api.calls.length - before;

  // The loader's file changes: the route's error is shown, not thrown.
  loader.set("ckpt_name", "missing.safetensors");
  await until(() => panel.message, "the error");
  out.error = { message: panel.message, last: api.calls.at(-1) };
  loader.set("ckpt_name", "tiny.safetensors");
  await until(() => !panel.message, "the error to clear");
  // Errors are not cached (the file may appear later): the same request goes out again.
  const missing = () => api.calls.filter((url) => url.includes("missing.safetensors")).length;
  out.error.asked = missing();
  loader.set("ckpt_name", "missing.safetensors");
  await until(() => panel.message, "the error again");
  out.error.askedAgain = missing();
  loader.set("ckpt_name", "tiny.safetensors");
  await until(() => !panel.message, "the error to clear again");

  // Overlay: a second schedule node is fetched and drawn; its edits refresh this plot.
  const other = new FakeNode(graph, 3, "LDMNoiseSchedule", [["beta_schedule", "linear"], ["steps", 6], ["spacing", "trailing"], ["zero_terminal_snr", true]]);
  extension.nodeCreated(other, app);
  const overlay = panel.widget.element.querySelector("input[type=checkbox]");
  overlay.checked = true;
  overlay.dispatchEvent(new Event("change"));
  await until(() => panel.series?.length === 2, "the overlay");
  out.pngOverlay = canvas.toDataURL("image/png");
  out.overlay = { labels: panel.series.map((s) => s.label), errors: panel.series.map((s) => s.error),
                  second: countPixels(canvas, rgb("#ffb74d"), [27, 27, 27], 40) };
  other.set("steps", 9);
  await until(() => panel.series?.[1]?.data?.steps.timesteps.length === 9, "the overlaid node's edit");
  out.overlayEdit = api.calls.filter((url) => url.includes("beta_schedule=linear&steps=9&"));

  // Unlinking the model: beta_schedule=model now lacks its ckpt_name; the route says so.
  node.inputs[0].link = null;
  node.onConnectionsChange?.(1, 0, false, null, node.inputs[0]);
  await until(() => panel.message, "the unlinked error");
  out.unlinked = panel.message;
  out.pngUnlinked = canvas.toDataURL("image/png");
  out.serializedAfter = node.serialize().widgets_values;
  return out;
}

for (const [id, test] of [["plot", plotTest], ["panel", panelTest]]) {
  try {
    report(id, await test());
  } catch (e) {
    report(id, { failed: String(e?.stack ?? e) });
  }
}
document.title = "done";
</script></body></html>
"""


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Server:
    """An aiohttp app on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app):
        self.app = app

    def __enter__(self):
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()


def make_test_app():
    app = routes.make_app()  # /ldm/schedule, and as ComfyUI mirrors it:
    app.router.add_get("/api" + routes.SCHEDULE_PATH, routes.schedule_handler)
    app.router.add_static("/extensions/ldm_nodes/", WEB)

    def text(body, content_type):
        async def handler(request):
            return web.Response(text=body, content_type=content_type)
        return handler

    app.router.add_get("/scripts/app.js", text(APP_STUB, "text/javascript"))
    app.router.add_get("/scripts/api.js", text(API_STUB, "text/javascript"))
    app.router.add_get("/test.html", text(PAGE, "text/html"))
    return app


def run_page(url, profile):
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
               f"--user-data-dir={profile}", "--virtual-time-budget=60000", "--dump-dom", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    dom = done.stdout
    results = {}
    for id_ in ("plot", "panel"):
        match = re.search(rf'<pre id="{id_}">(.*?)</pre>', dom, re.S)
        assert match, f"no #{id_} in the page (exit {done.returncode}): {dom[:500]} {done.stderr[-2000:]}"
        text = html.unescape(match.group(1))
        assert text != "pending", f"#{id_} never finished: {done.stderr[-2000:]}"
        results[id_] = json.loads(text)
    save_pngs(results, Path(profile).parent)
    return results


def save_pngs(value, folder, name="page"):
    """Write the page's canvases (data: URLs) next to the profile, for a look when a test fails."""
    if isinstance(value, dict):
        for key, item in list(value.items()):
            if isinstance(item, str) and item.startswith("data:image/png;base64,"):
                (folder / f"{name}_{key}.png").write_bytes(base64.b64decode(item.split(",", 1)[1]))
                del value[key]
            else:
                save_pngs(item, folder, f"{name}_{key}")


@pytest.fixture(scope="module")
def browser_results(tmp_path_factory):
    if chromium() is None:
        pytest.skip("no chromium binary (CI installs Debian's chromium package)")
    root = tmp_path_factory.mktemp("browser")
    schedule = {"beta_schedule": "linear", "num_timesteps": 400, "beta_start": None, "beta_end": None,
                "zero_terminal_snr": False}
    # the route reads only the header, but validates it as the loader does: the file must be a whole model
    edited_copy(SHIPPED_MODEL, root / "tiny.safetensors", edit_metadata=lambda m: {**m, "schedule": schedule})
    model_paths.set_model_dirs([root])
    try:
        with Server(make_test_app()) as server:
            yield run_page(f"http://127.0.0.1:{server.port}/test.html", root / "profile")
    finally:
        model_paths.set_model_dirs([])


def test_plot_draws_curves_markers_and_clips_infinities(browser_results):
    plot = browser_results["plot"]
    assert "failed" not in plot, plot.get("failed")
    assert plot["urls"][1] == "/ldm/schedule?beta_schedule=cosine&steps=12&spacing=trailing&zero_terminal_snr=true"
    for quantity, draw in plot["draws"].items():
        assert draw["quantity"] == quantity
        assert draw["curves"] == 2 and draw["markers"] == 20 + 12 and draw["errors"] == 0, draw
        assert draw["points"] == 2 * routes.MAX_POINTS, draw
        # log-SNR is -inf (null) at t = T-1 of the zero-terminal-SNR schedule: clipped, not dropped.
        assert draw["clipped"] == (1 if quantity == "log_snr" else 0), draw
        assert draw["redPixels"] > 400 and draw["bluePixels"] > 400, draw
        assert draw["redWithoutMarkers"] < draw["redPixels"] - 100 and draw["bareMarkers"] == 0, draw
        assert draw["drawnPixels"] > draw["redPixels"] + draw["bluePixels"], draw  # axes, ticks, legend too
        assert draw["xRange"] == [0, 1000], draw
    assert plot["draws"]["alpha_bar"]["yRange"] == [0, 1]
    assert plot["draws"]["sigma"]["yRange"][1] >= 4096  # log axis up to the clamped sigma_max
    error = plot["error"]
    assert error["status"] == 400 and error["body"]["error"].startswith("steps:")
    assert error["result"]["curves"] == 0 and error["result"]["errors"] == 1


def test_panel_follows_widgets_links_and_overlays(browser_results):
    panel = browser_results["panel"]
    assert "failed" not in panel, panel.get("failed")
    assert panel["extensions"] == ["ldm_nodes.schedule_panel"]
    # Not serialised: the workflow keeps exactly the four widget values.
    assert panel["widget"] == {"serialize": False, "optionSerialize": False, "type": "ldm_schedule_plot"}
    assert panel["serialized"] == ["model", 20, "karras", False]
    assert panel["serializedAfter"] == ["model", 10, "karras", False]
    first = panel["first"]
    assert first["calls"] == ["/ldm/schedule?beta_schedule=model&steps=20&spacing=karras&zero_terminal_snr=false"
                              "&ckpt_name=tiny.safetensors"]
    assert first["message"] is None and first["beta"] == "linear" and first["T"] == 400
    assert first["label"] == "this: #2 model=linear karras 20"
    assert first["own"] > 300 and first["canvas"][0] > 100, first  # the curve, in the first series colour
    assert len(panel["debounced"]) == 1 and "steps=10&" in panel["debounced"][0], panel["debounced"]
    assert panel["quantityFetches"] == 0
    assert panel["error"]["message"].startswith("ckpt_name:") and "missing.safetensors" in panel["error"]["last"]
    assert panel["error"]["askedAgain"] == panel["error"]["asked"] + 1, panel["error"]
    overlay = panel["overlay"]
    assert len(overlay["labels"]) == 2 and overlay["labels"][1].startswith("#3 linear+zsnr trailing 6")
    assert overlay["errors"] == [None, None] and overlay["second"] > 300, overlay
    assert len(panel["overlayEdit"]) >= 1, panel["overlayEdit"]
    assert panel["unlinked"].startswith("ckpt_name:") and "required" in panel["unlinked"]
