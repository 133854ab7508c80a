// Baseline for benches/decode_vs_transformers.rs: one sequence on llama.cpp, through the
// prebuilt CPU engine of node-llama-cpp. Prefill all but the last prompt token, then decode
// greedily one token per evaluation; 3 runs, one JSON line each.
//   node llamacpp_eval.mjs MODEL.gguf THREADS PROMPT_IDS NEW_TOKENS
import {getLlama} from "node-llama-cpp";

const [modelPath, threadsArg, promptIds, newArg] = process.argv.slice(2);
const threads = Number(threadsArg);
const newTokens = Number(newArg ?? 64);
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({threads, contextSize: 256, batchSize: 128, sequences: 1});
const seq = context.getSequence();
const prompt = promptIds.split(",").map(Number);
for (let rep = 0; rep < 3; rep++) {
  await seq.clearHistory();
  const t0 = performance.now();
  await seq.evaluateWithoutGeneratingNewTokens(prompt.slice(0, -1));
  const t1 = performance.now();
  let n = 0;
  let first = 0;
  for await (const _ of seq.evaluate(prompt.slice(-1), {temperature: 0})) {
    if (n === 0) first = performance.now();
    n++;
    if (n >= newTokens) break;
  }
  const t2 = performance.now();
  // The first token also evaluated the last prompt token; the n - 1 after it are decode.
  console.log(JSON.stringify({prefill_s: (t1 - t0) / 1000, decode_tok_s: (n - 1) / ((t2 - first) / 1000), threads}));
}
