// Makes the subgraph test data (tests/test_ui_workflow.py) with the real frontend: loads
// workflows/txt2img.json into a running ComfyUI, turns nodes into subgraphs with the frontend's own
// LGraph.convertToSubgraph (what "Convert to Subgraph" calls), promotes widgets the way its
// promoteWidget does (a subgraph input linked to the widget's slot), and writes for each case the
// UI file (app.graph.serialize()) and the API prompt (app.graphToPrompt().output). The nested case is
// also queued, and the PNG ComfyUI's SaveImage wrote is downloaded. tests/data/subgraphs/1.27.10/ holds the
// same cases exported by frontend 1.27.10 (the default of ComfyUI 0.3.64; its nested.png not kept).
//
//   npm install playwright-core   (drives Debian's chromium; downloads no browser; run the script from that
//   folder, with REPO=this repository when it lies elsewhere)
//   node tests/data/subgraphs/export.mjs http://127.0.0.1:8188 tests/data/subgraphs
//
// against a server with this pack and the frontend to record (e.g. 1.58.1 from build.sh's --front-end-root).
import { chromium } from "playwright-core";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const [url, out] = process.argv.slice(2);
const repo = process.env.REPO ?? join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const txt2img = JSON.parse(readFileSync(join(repo, "workflows", "txt2img.json"), "utf8"));

const browser = await chromium.launch({ executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"] });
const page = await browser.newPage();
page.on("pageerror", (e) => console.log("pageerror:", e.message));
await page.goto(url);
await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.LDMSample, null, { timeout: 120000 });
const version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? window.comfyAPI?.app?.app?.ui?.settings?.getSettingValue?.("Comfy.Version"));

const cases = {
  // the prompt and the negative prompt as one subgraph: a subgraph input (the text encoder), two outputs
  text: "convert([2, 3])",
  // decode and save as one subgraph: an output node inside, no subgraph output
  decode_save: "convert([7, 8])",
  // a subgraph inside a subgraph: the two prompts, then that subgraph with the schedule and the sampler
  nested: "const inner = convert([2, 3]); convert([inner.id, 4, 6])",
  // the sampler alone, its seed and cfg promoted to the subgraph node and set there
  promoted: `const s = convert([6]);
    promote(s, 6, "seed"); promote(s, 6, "cfg");
    s.widgets.find((w) => w.name === "seed").value = 7;
    s.widgets.find((w) => w.name === "cfg").value = 3.5`,
  // the sampler as a subgraph, bypassed: the empty latent passes through to the decoder
  bypassed: "convert([6]).mode = 4",
  // a second decode-and-save branch as a subgraph, muted: left out of the prompt
  muted: `const d = LiteGraph.createNode("LDMDecodeLatent"); graph.add(d);
    const s = LiteGraph.createNode("SaveImage"); graph.add(s);
    s.widgets[0].value = "ldm_muted";
    graph.getNodeById(1).connect(2, d, 0); graph.getNodeById(6).connect(0, d, 1); d.connect(0, s, 0);
    convert([d.id, s.id]).mode = 2`,
};

for (const [name, script] of Object.entries(cases)) {
  const result = await page.evaluate(async ([workflow, script]) => {
    const { app } = window.comfyAPI.app;
    await app.loadGraphData(structuredClone(workflow));
    const graph = app.graph;
    graph.getNodeById(4).widgets.find((w) => w.name === "steps").value = 4;  // a short test
    const convert = (ids) => graph.convertToSubgraph(new Set(ids.map((id) => graph.getNodeById(id)))).node;
    const promote = (subgraphNode, innerId, widgetName) => {  // the frontend's promoteValueWidgetViaSubgraphInput
      const inner = subgraphNode.subgraph.getNodeById(innerId);
      const slot = inner.getSlotFromWidget(inner.widgets.find((w) => w.name === widgetName));
      const input = subgraphNode.subgraph.addInput(widgetName, String(slot.type));
      if (!input.connect(slot, inner)) throw new Error(`cannot promote ${widgetName}`);
    };
    new Function("graph", "convert", "promote", "LiteGraph", script)(graph, convert, promote, window.LiteGraph);
    const prompt = await app.graphToPrompt();
    return { workflow: graph.serialize(), output: prompt.output };
  }, [txt2img, script]);
  writeFileSync(join(out, `${name}.json`), JSON.stringify(result.workflow, null, 1) + "\n");
  writeFileSync(join(out, `${name}.api.json`), JSON.stringify(result.output, null, 1) + "\n");
  console.log(name, Object.keys(result.output).join(" "));
  if (name === "nested") {
    const file = await page.evaluate(async () => {
      const { app } = window.comfyAPI.app;
      const { api } = window.comfyAPI.api;
      const done = new Promise((resolve) => api.addEventListener("executed", (e) => resolve(e.detail), { once: true }));
      await app.queuePrompt(0, 1);
      const detail = await done;
      const image = detail.output.images[0];
      const response = await api.fetchApi(`/view?filename=${encodeURIComponent(image.filename)}&subfolder=${image.subfolder}&type=${image.type}`);
      return Array.from(new Uint8Array(await response.arrayBuffer()));
    });
    writeFileSync(join(out, "nested.png"), Buffer.from(file));
  }
}
console.log("frontend", version);
await browser.close();
