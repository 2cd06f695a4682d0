#!/usr/bin/env node
// Median latency of one onnxruntime-node run of MODEL on a batch-1 input (tools/bench_export.py).
//
//   NODE_PATH=/path/to/node_modules node tools/time_node.js MODEL.onnx [REPEATS]
//
// Float inputs are filled with ((i * 7919) % 256) / 127.5 - 1 (as check_export_node.js), an
// int64 `target` with -1 (top-1); dynamic axes are 1. Prints {"median_ms": ..., "runs": ...}.
"use strict";

const ort = require("onnxruntime-node");

async function main() {
  const [modelPath, repeatsText] = process.argv.slice(2);
  const repeats = parseInt(repeatsText || "20", 10);
  const session = await ort.InferenceSession.create(modelPath, { intraOpNumThreads: 2 });
  const feeds = {};
  for (const meta of session.inputMetadata) {
    const dims = meta.shape.map((d) => (Number.isInteger(d) && d > 0 ? d : 1));
    const size = dims.reduce((a, b) => a * b, 1);
    feeds[meta.name] = meta.type === "int64"
      ? new ort.Tensor("int64", new BigInt64Array(size).fill(-1n), dims)
      : new ort.Tensor("float32", Float32Array.from({ length: size }, (_, i) => ((i * 7919) % 256) / 127.5 - 1), dims);
  }
  await session.run(feeds);  // warm-up
  const times = [];
  for (let i = 0; i < repeats; i++) {
    const started = process.hrtime.bigint();
    await session.run(feeds);
    times.push(Number(process.hrtime.bigint() - started) / 1e6);
  }
  times.sort((a, b) => a - b);
  console.log(JSON.stringify({ median_ms: times[Math.floor(times.length / 2)], runs: repeats }));
}

main().catch((error) => { console.error(`error: ${error.message}`); process.exit(1); });
