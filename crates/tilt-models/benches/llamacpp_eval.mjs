// Baseline for benches/decode_vs_transformers.rs: N sequences in one llama.cpp context,
// through the prebuilt CPU engine of node-llama-cpp. Each sequence prefills all but the last
// prompt token (the N prefills are evaluated together), then the N sequences decode
// greedily one token per evaluation, concurrently: node-llama-cpp gathers the pending
// tokens of all the context's sequences into one llama_decode batch per step. 3 runs, one
// JSON line each.
//   node llamacpp_eval.mjs MODEL.gguf THREADS PROMPT_IDS NEW_TOKENS [N]
import {getLlama} from "node-llama-cpp";

const [modelPath, threadsArg, promptIds, newArg, nArg] = process.argv.slice(2);
const threads = Number(threadsArg);
const newTokens = Number(newArg ?? 64);
const n = Number(nArg ?? 1);
const prompt = promptIds.split(",").map(Number);
const perSequence = prompt.length + newTokens + 8;
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({
  threads,
  sequences: n,
  // The KV cache is shared by the sequences: room for all of them.
  contextSize: Math.max(256, 64 * Math.ceil((n * perSequence) / 64)),
  batchSize: Math.max(128, n * prompt.length),
});
const seqs = Array.from({length: n}, () => context.getSequence());
for (let rep = 0; rep < 3; rep++) {
  await Promise.all(seqs.map((s) => s.clearHistory()));
  const t0 = performance.now();
  await Promise.all(seqs.map((s) => s.evaluateWithoutGeneratingNewTokens(prompt.slice(0, -1))));
  const t1 = performance.now();
  const firsts = new Array(n).fill(0);
  const counts = new Array(n).fill(0);
  await Promise.all(
    seqs.map(async (s, i) => {
      for await (const _ of s.evaluate(prompt.slice(-1), {temperature: 0})) {
        if (counts[i] === 0) firsts[i] = performance.now();
        counts[i]++;
        if (counts[i] >= newTokens) break;
      }
    }),
  );
  const t2 = performance.now();
  // The first token of each sequence also evaluated its last prompt token; the tokens after
  // the last sequence's first one are the decode.
  const start = Math.max(...firsts);
  const decoded = counts.reduce((a, c) => a + c - 1, 0);
  console.log(
    JSON.stringify({n, threads, prefill_s: (t1 - t0) / 1000, decode_tok_s: decoded / ((t2 - start) / 1000)}),
  );
}
