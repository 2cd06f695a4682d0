#!/usr/bin/env node
// Run a model exported by `onnxcam export` with onnxruntime-node, no onnxcam involved, and
// print what it computed as one JSON line: the heatmap's shape, a checksum (sum, min, max)
// and the explained classes.
//
//   NODE_PATH=/path/to/node_modules node tools/check_export_node.js MODEL.onnx [INPUT.f32] [TARGET]
//
// INPUT.f32: the image batch as raw little-endian float32 in the model's layout (the batch
// size is what the file holds); without it, one image filled with ((i * 7919) % 256) / 127.5 - 1,
// exact in float32, so any language can rebuild it. TARGET: the class for every image, -1
// (default) for each image's top-1.
// CommonJS on purpose: require() honours NODE_PATH (ES module imports do not), so the
// onnxruntime-node package can live outside this repository.
"use strict";

const fs = require("fs");
let ort;
try {
  ort = require("onnxruntime-node");
} catch (error) {
  console.error("error: onnxruntime-node not found: `npm install --ignore-scripts onnxruntime-node` " +
                "somewhere and point NODE_PATH at its node_modules");
  process.exit(3);
}

function imageInput(session, inputPath) {
  const meta = session.inputMetadata.find((m) => m.name !== "target");
  const inner = meta.shape.slice(1).map(Number);
  if (inner.some((d) => !Number.isInteger(d) || d <= 0)) {
    throw new Error(`input '${meta.name}' has a dynamic size ${JSON.stringify(meta.shape)}; export with --size`);
  }
  const perImage = inner.reduce((a, b) => a * b, 1);
  let data;
  if (inputPath) {
    const bytes = fs.readFileSync(inputPath);
    data = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
  } else {
    data = Float32Array.from({ length: perImage }, (_, i) => ((i * 7919) % 256) / 127.5 - 1);
  }
  if (data.length % perImage !== 0) {
    throw new Error(`${inputPath}: ${data.length} floats is not a whole number of ${JSON.stringify(inner)} images`);
  }
  return [meta.name, new ort.Tensor("float32", data, [data.length / perImage, ...inner])];
}

async function main() {
  const [modelPath, inputPath, targetText] = process.argv.slice(2);
  if (!modelPath) {
    console.error("usage: node tools/check_export_node.js MODEL.onnx [INPUT.f32] [TARGET]");
    process.exit(2);
  }
  const session = await ort.InferenceSession.create(modelPath);
  const [inputName, image] = imageInput(session, inputPath);
  const batch = image.dims[0];
  const target = BigInt(targetText === undefined ? -1 : parseInt(targetText, 10));
  const feeds = { [inputName]: image, target: new ort.Tensor("int64", new BigInt64Array(batch).fill(target), [batch]) };
  const out = await session.run(feeds);
  const heatmap = out.heatmap.data;
  let sum = 0, min = Infinity, max = -Infinity;
  for (const v of heatmap) { sum += v; min = Math.min(min, v); max = Math.max(max, v); }
  console.log(JSON.stringify({
    heatmap_shape: out.heatmap.dims, heatmap_sum: sum, heatmap_min: min, heatmap_max: max,
    target_class: Array.from(out.target_class.data, Number),
  }));
}

main().catch((error) => { console.error(`error: ${error.message}`); process.exit(1); });
