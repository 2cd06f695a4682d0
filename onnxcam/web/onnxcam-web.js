// onnxcam export --web: run a self-explaining ONNX model in the browser with onnxruntime-web.
//
// config.json (written by onnxcam) says where the model and onnxruntime-web are, the input's
// name, layout, size and normalization ((pixel / scale - mean) / std per channel, as onnxcam's
// Preprocess), the labels, and whether the model takes a `target` input. `?ort=URL` overrides
// where onnxruntime-web is loaded from (a folder holding ort.min.js and its .wasm files);
// `?image=URL` explains that image on load (used by tests and for links).
"use strict";

const status = (text) => { document.getElementById("status").textContent = text; };

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = src;
    script.onload = resolve;
    script.onerror = () => reject(new Error(`cannot load ${src}: point ?ort= at a copy of onnxruntime-web/dist ` +
                                            "(npm install onnxruntime-web)"));
    document.head.appendChild(script);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error(`cannot decode the image ${src}`));
    image.src = src;
  });
}

// The model input from an image: drawn at the model's size (exact when it already has that
// size), then normalized channel by channel in the model's layout.
function inputTensor(image, config) {
  const [height, width] = config.size;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(image, 0, 0, width, height);
  const rgba = context.getImageData(0, 0, width, height).data;
  const channels = config.channels;
  const data = new Float32Array(channels * height * width);
  const order = config.channel_order === "BGR" ? [2, 1, 0] : [0, 1, 2];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const pixel = (y * width + x) * 4;
      for (let c = 0; c < channels; c++) {
        // one-channel models take the mean of R, G, B
        const raw = channels === 1 ? (rgba[pixel] + rgba[pixel + 1] + rgba[pixel + 2]) / 3 : rgba[pixel + order[c]];
        const value = (raw / config.scale - config.mean[c]) / config.std[c];
        const at = config.layout === "NCHW" ? (c * height + y) * width + x : (y * width + x) * channels + c;
        data[at] = value;
      }
    }
  }
  const dims = config.layout === "NCHW" ? [1, channels, height, width] : [1, height, width, channels];
  return new ort.Tensor("float32", data, dims);
}

// OpenCV's COLORMAP_JET, as onnxcam's overlays use it.
function jet(v) {
  const f = (x) => Math.round(255 * Math.min(Math.max(x, 0), 1));
  return [f(1.5 - Math.abs(4 * v - 3)), f(1.5 - Math.abs(4 * v - 2)), f(1.5 - Math.abs(4 * v - 1))];
}

function draw(image, heatmap, height, width) {
  const view = document.getElementById("view");
  view.width = image.naturalWidth;
  view.height = image.naturalHeight;
  const context = view.getContext("2d");
  context.drawImage(image, 0, 0);
  const map = document.createElement("canvas");
  map.width = width;
  map.height = height;
  const mapContext = map.getContext("2d");
  const pixels = mapContext.createImageData(width, height);
  for (let i = 0; i < width * height; i++) {
    const [r, g, b] = jet(heatmap[i]);
    pixels.data.set([r, g, b, 255], i * 4);
  }
  mapContext.putImageData(pixels, 0, 0);
  context.globalAlpha = 0.5;
  context.drawImage(map, 0, 0, view.width, view.height);
  context.globalAlpha = 1;
}

function base64(floats) {
  const bytes = new Uint8Array(floats.buffer, floats.byteOffset, floats.byteLength);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

async function explain(session, config, src) {
  status("explaining…");
  const image = await loadImage(src);
  const input = inputTensor(image, config);
  const feeds = { [config.input]: input };
  if (config.target) feeds.target = new ort.Tensor("int64", BigInt64Array.from([-1n]), [1]);
  const started = performance.now();
  const outputs = await session.run(feeds);
  const ms = performance.now() - started;
  const heatmap = outputs.heatmap.data;
  const classes = Array.from(outputs.target_class.data, Number);
  const [height, width] = config.size;
  draw(image, heatmap.subarray(0, height * width), height, width);
  let sum = 0, min = Infinity, max = -Infinity;
  for (const v of heatmap) { sum += v; min = Math.min(min, v); max = Math.max(max, v); }
  const result = {
    classes, labels: classes.map((c) => (config.labels && config.labels[c]) || null),
    heatmap_shape: outputs.heatmap.dims.map(Number), heatmap_sum: sum, heatmap_min: min, heatmap_max: max,
    ms, method: config.method,
  };
  document.getElementById("result").textContent = JSON.stringify(result);
  document.getElementById("input").textContent = base64(input.data);
  status(`class ${classes[0]}${result.labels[0] ? " (" + result.labels[0] + ")" : ""}, ${config.method}, ` +
         `${ms.toFixed(1)} ms`);
  document.title = "onnxcam: done";
}

async function main() {
  const params = new URLSearchParams(location.search);
  const config = await (await fetch("config.json")).json();
  const base = params.get("ort") || config.ort;
  // absolute: onnxruntime-web imports its .mjs/.wasm files from this URL as modules
  const folder = new URL(base.endsWith("/") ? base : base + "/", location.href).href;
  await loadScript(folder + "ort.min.js");
  ort.env.wasm.wasmPaths = folder;
  ort.env.wasm.numThreads = 1;  // threads need cross-origin isolation, which a static host may not give
  const session = await ort.InferenceSession.create(config.model, { executionProviders: ["wasm"] });
  status("pick an image");
  document.getElementById("picker").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) explain(session, config, URL.createObjectURL(file)).catch(fail);
  });
  if (params.get("image")) {
    await explain(session, config, params.get("image"));
    const repeat = parseInt(params.get("repeat") || "0", 10);
    if (repeat > 0) await timeRuns(session, config, params.get("image"), repeat);
  }
}

// `?repeat=N` (tools/bench_export.py): N more runs between two console lines, whose wall-clock
// stamps in Chromium's log time them (performance.now() is virtual in a headless test run).
async function timeRuns(session, config, src, repeat) {
  const input = inputTensor(await loadImage(src), config);
  const feeds = { [config.input]: input };
  if (config.target) feeds.target = new ort.Tensor("int64", BigInt64Array.from([-1n]), [1]);
  console.log(`onnxcam-timing start ${repeat}`);
  for (let i = 0; i < repeat; i++) await session.run(feeds);
  console.log(`onnxcam-timing end ${repeat}`);
}

function fail(error) {
  status(`error: ${error.message}`);
  document.getElementById("result").textContent = JSON.stringify({ error: error.message });
  document.title = "onnxcam: error";
}

main().catch(fail);
