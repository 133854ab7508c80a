//! tilt's Llama on tiny random models written as GGUF files by the test itself: batched vs
//! separate forwards, forked vs fresh caches, full-sequence vs step-wise log-probs, thread
//! count invariance, a naive no-cache reference forward, and errors on bad files and input.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tilt_models::sampling::{SamplingParams, SequenceSampler};
use tilt_models::{LlamaPolicy, ModelError, Policy, StepOutput, TokenId};

const D: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = D / HEADS;
const FFN: usize = 48;
const LAYERS: usize = 2;
const CTX: usize = 40;
const EPS: f32 = 1e-5;
const ROPE_BASE: f32 = 10000.0;

/// GPT-2's byte → printable character map (the byte-level BPE alphabet).
fn byte_chars() -> Vec<char> {
    let direct: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut map = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if direct.contains(&b) {
            map[b as usize] = char::from_u32(b).unwrap();
        } else {
            map[b as usize] = char::from_u32(256 + extra).unwrap();
            extra += 1;
        }
    }
    map
}

/// The tiny vocabulary: 3 control tokens, 256 byte tokens, then merged tokens.
fn vocab() -> (Vec<String>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend(byte_chars().into_iter().map(|c| c.to_string()));
    let merges = ["h e", "l l", "he ll", "Ġ t", "Ġt he"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    (tokens, merges.iter().map(|s| s.to_string()).collect())
}

struct Weights {
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// Store the matrices as the shipped SmolLM2 does (Q8_0 embedding, Q4_1 layers; a
    /// matrix whose rows are not whole 32-blocks stays f32), else all f32.
    quantized: bool,
}

impl Weights {
    fn dtype(&self, name: &str, shape: &[usize]) -> GgmlDType {
        let blocks = shape.len() == 2 && shape[1].is_multiple_of(32);
        match (self.quantized && blocks, name) {
            (true, "token_embd.weight") => GgmlDType::Q8_0,
            (true, _) => GgmlDType::Q4_1,
            (false, _) => GgmlDType::F32,
        }
    }

    /// Replace every value by what the file stores (the dequantised block values), so
    /// that the reference forward computes with the weights the model reads.
    fn round_to_storage(mut self) -> Self {
        let dtypes: Vec<GgmlDType> = self
            .tensors
            .iter()
            .map(|(n, s, _)| self.dtype(n, s))
            .collect();
        for ((_, shape, data), dtype) in self.tensors.iter_mut().zip(dtypes) {
            let t = Tensor::from_slice(data, shape.as_slice(), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&t, dtype).unwrap();
            *data = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
        }
        self
    }
}

fn random_weights(seed: u64, vocab: usize) -> Weights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut mat = |rows: usize, cols: usize, scale: f32| -> Vec<f32> {
        (0..rows * cols)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect()
    };
    let mut tensors = vec![
        (
            "token_embd.weight".to_string(),
            vec![vocab, D],
            mat(vocab, D, 1.0),
        ),
        (
            "output_norm.weight".to_string(),
            vec![D],
            mat(1, D, 0.2).iter().map(|x| 1.0 + x).collect(),
        ),
    ];
    let kvd = KV_HEADS * HD;
    for l in 0..LAYERS {
        let s = 1.0 / (D as f32).sqrt();
        let mut push = |n: &str, shape: Vec<usize>, data: Vec<f32>| {
            tensors.push((format!("blk.{l}.{n}.weight"), shape, data));
        };
        push(
            "attn_norm",
            vec![D],
            mat(1, D, 0.2).iter().map(|x| 1.0 + x).collect(),
        );
        push("attn_q", vec![D, D], mat(D, D, 2.0 * s));
        push("attn_k", vec![kvd, D], mat(kvd, D, 2.0 * s));
        push("attn_v", vec![kvd, D], mat(kvd, D, s));
        push("attn_output", vec![D, D], mat(D, D, s));
        push(
            "ffn_norm",
            vec![D],
            mat(1, D, 0.2).iter().map(|x| 1.0 + x).collect(),
        );
        push("ffn_gate", vec![FFN, D], mat(FFN, D, s));
        push("ffn_up", vec![FFN, D], mat(FFN, D, s));
        push(
            "ffn_down",
            vec![D, FFN],
            mat(D, FFN, 1.0 / (FFN as f32).sqrt()),
        );
    }
    Weights {
        tensors,
        quantized: false,
    }
}

/// Write a tiny Llama GGUF; `edit` may change metadata before writing.
fn write_gguf(path: &Path, w: &Weights, edit: impl Fn(&mut Vec<(String, Value)>)) {
    let (tokens, merges) = vocab();
    let n = tokens.len();
    let mut types = vec![Value::I32(1); n];
    for t in types.iter_mut().take(3) {
        *t = Value::I32(3);
    }
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(LAYERS as u32)),
        ("llama.context_length".into(), Value::U32(CTX as u32)),
        ("llama.embedding_length".into(), Value::U32(D as u32)),
        ("llama.feed_forward_length".into(), Value::U32(FFN as u32)),
        ("llama.attention.head_count".into(), Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv".into(), Value::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base".into(), Value::F32(ROPE_BASE)),
        ("llama.rope.dimension_count".into(), Value::U32(HD as u32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(EPS)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        (
            "tokenizer.chat_template".into(),
            Value::String("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into()),
        ),
    ];
    edit(&mut md);
    let qts: Vec<(String, QTensor)> = w
        .tensors
        .iter()
        .map(|(name, shape, data)| {
            let t = Tensor::from_slice(data, shape.as_slice(), &Device::Cpu).unwrap();
            (
                name.clone(),
                QTensor::quantize(&t, w.dtype(name, shape)).unwrap(),
            )
        })
        .collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

struct Tiny {
    _dir: tempfile::TempDir,
    path: PathBuf,
    weights: Weights,
}

fn tiny() -> Tiny {
    tiny_as(false)
}

/// The tiny model with f32 weights, or (`quantized`) with SmolLM2's storage formats.
fn tiny_as(quantized: bool) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    let mut raw = random_weights(7, vocab().0.len());
    raw.quantized = quantized;
    write_gguf(&path, &raw, |_| {});
    let weights = raw.round_to_storage();
    Tiny {
        _dir: dir,
        path,
        weights,
    }
}

/// Both formats of the tiny model.
fn tinies() -> [Tiny; 2] {
    [tiny_as(false), tiny_as(true)]
}

fn load(t: &Tiny, threads: usize) -> LlamaPolicy {
    LlamaPolicy::load(&t.path, threads).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

/// Bit for bit: every output element is computed by one fixed sequence of operations,
/// whatever else shares the batch (see the matmul module of tilt-models).
fn assert_same(a: &StepOutput, b: &StepOutput, what: &str) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let dl = max_abs_diff(&a.log_probs, &b.log_probs);
    let dh = max_abs_diff(&a.hidden, &b.hidden);
    assert!(
        bits(&a.log_probs) == bits(&b.log_probs) && bits(&a.hidden) == bits(&b.hidden),
        "{what}: not bit-identical (log-prob diff {dl}, hidden diff {dh})"
    );
    assert_eq!(argmax(&a.log_probs), argmax(&b.log_probs), "{what}");
}

// ---------- a naive reference forward: whole sequence, no cache, plain loops ----------

fn tensor<'a>(w: &'a Weights, name: &str) -> &'a [f32] {
    &w.tensors.iter().find(|(n, _, _)| n == name).unwrap().2
}

fn linear(w: &[f32], x: &[f32], out: usize) -> Vec<f32> {
    let inp = x.len();
    (0..out)
        .map(|o| {
            (0..inp)
                .map(|i| w[o * inp + i] as f64 * x[i] as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

fn norm(x: &[f32], g: &[f32]) -> Vec<f32> {
    let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + EPS as f64).sqrt();
    x.iter()
        .zip(g)
        .map(|(v, g)| (*v as f64 * s) as f32 * g)
        .collect()
}

fn rope(v: &mut [f32], pos: usize) {
    for i in 0..HD / 2 {
        let theta = pos as f64 * (ROPE_BASE as f64).powf(-(2.0 * i as f64) / HD as f64);
        let (c, s) = (theta.cos(), theta.sin());
        let (a, b) = (v[2 * i] as f64, v[2 * i + 1] as f64);
        v[2 * i] = (a * c - b * s) as f32;
        v[2 * i + 1] = (a * s + b * c) as f32;
    }
}

/// Log-probs at every position of `tokens`, computed from scratch.
fn reference_log_probs(w: &Weights, tokens: &[TokenId]) -> Vec<Vec<f32>> {
    let vocab = vocab().0.len();
    let kvd = KV_HEADS * HD;
    let embd = tensor(w, "token_embd.weight");
    let mut h: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| embd[t as usize * D..(t as usize + 1) * D].to_vec())
        .collect();
    for l in 0..LAYERS {
        let t = |n: &str| tensor(w, &format!("blk.{l}.{n}.weight"));
        let xs: Vec<Vec<f32>> = h.iter().map(|x| norm(x, t("attn_norm"))).collect();
        let mut q: Vec<Vec<f32>> = xs.iter().map(|x| linear(t("attn_q"), x, D)).collect();
        let mut k: Vec<Vec<f32>> = xs.iter().map(|x| linear(t("attn_k"), x, kvd)).collect();
        let v: Vec<Vec<f32>> = xs.iter().map(|x| linear(t("attn_v"), x, kvd)).collect();
        for p in 0..tokens.len() {
            for hq in q[p].chunks_mut(HD) {
                rope(hq, p);
            }
            for hk in k[p].chunks_mut(HD) {
                rope(hk, p);
            }
        }
        for p in 0..tokens.len() {
            let mut att = vec![0f32; D];
            for head in 0..HEADS {
                let kh = head / (HEADS / KV_HEADS);
                let qh = &q[p][head * HD..(head + 1) * HD];
                let scores: Vec<f64> = (0..=p)
                    .map(|j| {
                        let kj = &k[j][kh * HD..(kh + 1) * HD];
                        qh.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>()
                            / (HD as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let pj = (s - m).exp() / z;
                    for e in 0..HD {
                        att[head * HD + e] += (pj * v[j][kh * HD + e] as f64) as f32;
                    }
                }
            }
            let o = linear(t("attn_output"), &att, D);
            for (a, b) in h[p].iter_mut().zip(o) {
                *a += b;
            }
            let x = norm(&h[p], t("ffn_norm"));
            let g = linear(t("ffn_gate"), &x, FFN);
            let u = linear(t("ffn_up"), &x, FFN);
            let act: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let dn = linear(t("ffn_down"), &act, D);
            for (a, b) in h[p].iter_mut().zip(dn) {
                *a += b;
            }
        }
    }
    h.iter()
        .map(|x| {
            let hn = norm(x, tensor(w, "output_norm.weight"));
            let lg = linear(embd, &hn, vocab);
            let m = lg.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = m as f64 + lg.iter().map(|v| ((v - m) as f64).exp()).sum::<f64>().ln();
            lg.iter().map(|v| (*v as f64 - lse) as f32).collect()
        })
        .collect()
}

// ---------- tests ----------

#[test]
fn extend_matches_naive_reference_forward() {
    for t in tinies() {
        let p = load(&t, 1);
        // A 3-row prefill and a 12-row extend; single steps, tested below, take the
        // one-row kernel.
        let tokens: Vec<TokenId> = vec![5, 17, 200, 3, 99, 42, 42, 7, 250, 11, 64, 65, 66, 9, 1];
        let (mut cache, first) = p.prefill(&tokens[..3]).unwrap();
        let rest = p.extend(&mut cache, &tokens[3..]).unwrap();
        let reference = reference_log_probs(&t.weights, &tokens);
        let ours: Vec<&StepOutput> = std::iter::once(&first).chain(rest.iter()).collect();
        for (i, o) in ours.iter().enumerate() {
            let d = max_abs_diff(&o.log_probs, &reference[i + 2]);
            assert!(
                d < 1e-4,
                "quantized {}: position {}: max |Δ log p| = {d}",
                t.weights.quantized,
                i + 2
            );
        }
    }
}

#[test]
fn batched_step_equals_separate_steps() {
    for t in tinies() {
        batched_step_equals_separate_steps_on(&t);
    }
}

fn batched_step_equals_separate_steps_on(t: &Tiny) {
    let p = load(t, 2);
    // 10 sequences batched (the multi-row kernels) against one at a time (the one-row
    // kernel, which dequantises in registers): bit for bit.
    let prompts: [&[TokenId]; 10] = [
        &[4, 8, 15],
        &[16, 23, 42, 100, 7],
        &[200],
        &[1, 2],
        &[9, 9, 9, 9],
        &[77],
        &[12, 13, 14, 15, 16, 17],
        &[250, 251],
        &[30],
        &[31, 32, 33],
    ];
    let next: [TokenId; 10] = [9, 250, 3, 4, 5, 6, 7, 8, 10, 11];
    let mut batch: Vec<_> = prompts.iter().map(|pr| p.prefill(pr).unwrap().0).collect();
    let batched = p.step(&mut batch, &next).unwrap();
    for (i, pr) in prompts.iter().enumerate() {
        let (mut c, _) = p.prefill(pr).unwrap();
        let alone = p.step(std::slice::from_mut(&mut c), &next[i..=i]).unwrap();
        assert_same(&batched[i], &alone[0], &format!("sequence {i}"));
        assert_eq!(batch[i].len(), pr.len() + 1);
    }
}

#[test]
fn forked_cache_equals_fresh_prefill() {
    for t in tinies() {
        forked_cache_equals_fresh_prefill_on(&t);
    }
}

fn forked_cache_equals_fresh_prefill_on(t: &Tiny) {
    let p = load(t, 2);
    let prompt: Vec<TokenId> = vec![30, 31, 32, 33, 34];
    let (cache, _) = p.prefill(&prompt).unwrap();
    assert_eq!(cache.shared_len(), prompt.len());
    let mut forks = vec![cache.clone(), cache.clone(), cache];
    let a = p.step(&mut forks, &[60, 61, 62]).unwrap();
    let b = p.step(&mut forks, &[70, 71, 72]).unwrap();
    for (i, (first, second)) in [(60, 70), (61, 71), (62, 72)].into_iter().enumerate() {
        let mut full = prompt.clone();
        full.push(first);
        let (_, fresh1) = p.prefill(&full).unwrap();
        assert_same(&a[i], &fresh1, &format!("fork {i}, first step"));
        full.push(second);
        let (_, fresh2) = p.prefill(&full).unwrap();
        assert_same(&b[i], &fresh2, &format!("fork {i}, second step"));
    }
    // Forking a cache with a private suffix (blockwise decoding), before and after share().
    let mut c = forks[0].clone();
    let mut shared = forks[0].clone();
    shared.share();
    assert_eq!(shared.shared_len(), shared.len());
    let x = p.extend(&mut c, &[80, 81]).unwrap();
    let y = p.extend(&mut shared, &[80, 81]).unwrap();
    for (u, v) in x.iter().zip(&y) {
        assert_eq!(u, v, "share() changed the numbers");
    }
    // The fork from which c was cloned is untouched by c's extension.
    assert_eq!(forks[0].len(), prompt.len() + 2);
}

#[test]
fn response_log_probs_equal_sum_of_step_wise_log_probs() {
    for t in tinies() {
        response_log_probs_equal_step_wise_log_probs_on(&t);
    }
}

fn response_log_probs_equal_step_wise_log_probs_on(t: &Tiny) {
    let p = load(t, 1);
    let context: Vec<TokenId> = vec![1, 100, 101, 102];
    let response: Vec<TokenId> = vec![50, 51, 52, 2, 9];
    let batched = p.response_log_probs(&context, &response).unwrap();
    // Step-wise: prefill, then one step per token.
    let (mut c, mut out) = p.prefill(&context).unwrap();
    let mut stepwise = Vec::new();
    for &tok in &response {
        stepwise.push(out.log_probs[tok as usize]);
        out = p
            .step(std::slice::from_mut(&mut c), &[tok])
            .unwrap()
            .remove(0);
    }
    // One forward over the whole response gives the step-wise values bit for bit.
    for (a, b) in batched.iter().zip(&stepwise) {
        assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b}");
    }
    // And against the naive reference.
    let mut all = context.clone();
    all.extend(&response);
    let reference = reference_log_probs(&t.weights, &all);
    for (i, &tok) in response.iter().enumerate() {
        let r = reference[context.len() - 1 + i][tok as usize];
        assert!(
            (r - batched[i]).abs() < 1e-4,
            "token {i}: {r} vs {}",
            batched[i]
        );
    }
    assert!(p.response_log_probs(&[], &response).is_err());
}

/// Sample 12 tokens for 9 forks of one prompt, one ChaCha stream per sequence.
fn sample_run(p: &LlamaPolicy, seed: u64) -> (Vec<Vec<TokenId>>, Vec<Vec<u32>>) {
    let params = SamplingParams::new(1.5, Some(100), Some(0.99)).unwrap();
    let (cache, first) = p.prefill(&[1, 40, 41, 42]).unwrap();
    // 9 sequences batched.
    let n = 9;
    let mut caches = vec![cache; n];
    let mut samplers: Vec<_> = (0..n as u64)
        .map(|i| SequenceSampler::new(seed, i))
        .collect();
    let mut outs: Vec<StepOutput> = vec![first; n];
    let mut seqs = vec![Vec::new(); n];
    let mut bits = vec![Vec::new(); n];
    for _ in 0..12 {
        let toks: Vec<TokenId> = outs
            .iter()
            .zip(samplers.iter_mut())
            .map(|(o, s)| s.sample(&o.log_probs, &params).unwrap().token)
            .collect();
        for i in 0..n {
            seqs[i].push(toks[i]);
            bits[i].extend(outs[i].log_probs.iter().map(|x| x.to_bits()));
        }
        outs = p.step(&mut caches, &toks).unwrap();
    }
    (seqs, bits)
}

#[test]
fn same_seed_same_samples_and_bits_at_one_and_two_threads() {
    for t in tinies() {
        same_seed_same_samples_on(&t);
    }
}

fn same_seed_same_samples_on(t: &Tiny) {
    let one = load(t, 1);
    let two = load(t, 2);
    assert_eq!(one.model().num_threads(), 1);
    assert_eq!(two.model().num_threads(), 2);
    let (s1, b1) = sample_run(&one, 11);
    let (s2, b2) = sample_run(&two, 11);
    assert_eq!(s1, s2);
    assert!(b1 == b2, "log-probs differ bitwise between 1 and 2 threads");
    let (s3, _) = sample_run(&one, 12);
    assert_ne!(s1, s3, "a different seed should give different samples");
}

#[test]
fn tokenizer_round_trips_and_applies_merges() {
    let t = tiny();
    let p = load(&t, 1);
    let ids = p.encode("hello the 42").unwrap();
    // "he"+"ll" merge to "hell"; " t"+"he" to " the"; digits split one by one.
    let (tokens, _) = vocab();
    let strs: Vec<&str> = ids.iter().map(|&i| tokens[i as usize].as_str()).collect();
    assert_eq!(strs, ["hell", "o", "Ġthe", "Ġ", "4", "2"]);
    for s in ["hello the 42", "naïve — 日本 🎉", "  two  spaces\n\ttab"] {
        assert_eq!(p.decode(&p.encode(s).unwrap()).unwrap(), s);
    }
    let chat = p.chat_prompt("hi").unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = p.encode(&chat).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> must map to its control id");
    assert_eq!(p.decode(&ids).unwrap(), "user\nhi\nassistant\n");
    assert_eq!(p.eos_token_ids(), &[2]);
}

fn err_of(path: &Path) -> ModelError {
    LlamaPolicy::load(path, 1).expect_err("loading should fail")
}

#[test]
fn bad_files_give_clear_errors() {
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("nope.gguf");
    let e = err_of(&missing);
    assert!(matches!(e, ModelError::BadFile { .. }), "{e}");
    assert!(
        e.to_string().contains("nope.gguf") && e.to_string().contains("cannot open"),
        "{e}"
    );

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
    let e = err_of(&garbage);
    assert!(e.to_string().contains("not a valid GGUF"), "{e}");

    let bytes = std::fs::read(&t.path).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let e = err_of(&truncated);
    assert!(e.to_string().contains("truncated"), "{e}");
    let header_cut = dir.path().join("header-cut.gguf");
    std::fs::write(&header_cut, &bytes[..1000]).unwrap();
    let e = err_of(&header_cut);
    assert!(matches!(e, ModelError::BadFile { .. }), "{e}");

    let gpt2 = dir.path().join("gpt2.gguf");
    write_gguf(&gpt2, &t.weights, |md| {
        md[0].1 = Value::String("gpt2".into());
    });
    let e = err_of(&gpt2);
    assert!(
        matches!(e, ModelError::UnsupportedArchitecture { ref arch, .. } if arch == "gpt2"),
        "{e}"
    );

    let no_heads = dir.path().join("no-heads.gguf");
    write_gguf(&no_heads, &t.weights, |md| {
        md.retain(|(k, _)| k != "llama.attention.head_count");
    });
    let e = err_of(&no_heads);
    assert!(
        e.to_string()
            .contains("llama.attention.head_count is missing"),
        "{e}"
    );

    let missing_tensor = dir.path().join("missing-tensor.gguf");
    let mut w = random_weights(1, vocab().0.len());
    w.tensors.retain(|(n, _, _)| n != "blk.1.ffn_up.weight");
    write_gguf(&missing_tensor, &w, |_| {});
    let e = err_of(&missing_tensor);
    assert!(
        e.to_string().contains("blk.1.ffn_up.weight is missing"),
        "{e}"
    );

    let mut w = random_weights(1, vocab().0.len());
    for (n, shape, data) in w.tensors.iter_mut() {
        if n == "blk.0.attn_q.weight" {
            *shape = vec![D / 2, D];
            data.truncate(D * D / 2);
        }
    }
    let wrong_shape = dir.path().join("wrong-shape.gguf");
    write_gguf(&wrong_shape, &w, |_| {});
    let e = err_of(&wrong_shape);
    assert!(
        e.to_string().contains("blk.0.attn_q.weight has shape"),
        "{e}"
    );
}

#[test]
fn bad_input_gives_clear_errors_and_leaves_caches_unchanged() {
    let t = tiny();
    let p = load(&t, 1);
    let e = p.prefill(&[]).unwrap_err();
    assert!(
        matches!(e, ModelError::InvalidInput(_)) && e.to_string().contains("empty"),
        "{e}"
    );
    let e = p.prefill(&[3, 100_000]).unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    let long: Vec<TokenId> = vec![5; CTX + 1];
    let e = p.prefill(&long).unwrap_err();
    assert!(e.to_string().contains("context overflow"), "{e}");

    let (c, _) = p.prefill(&[5; CTX - 1]).unwrap();
    let mut caches = vec![c.clone(), c];
    let e = p.step(&mut caches, &[1]).unwrap_err();
    assert!(e.to_string().contains("2 caches but 1 tokens"), "{e}");
    p.step(&mut caches, &[1, 2]).unwrap();
    let e = p.step(&mut caches, &[1, 2]).unwrap_err();
    assert!(e.to_string().contains("context overflow"), "{e}");
    assert_eq!(
        caches[0].len(),
        CTX,
        "a failed step must not change the cache"
    );
    let e = p.step(&mut caches[..1], &[999]).unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
}

// ---------- what a file may declare: implemented, neutral, or refused ----------

/// Set metadata `key` to `value` (replacing it, or adding it).
fn set(md: &mut Vec<(String, Value)>, key: &str, value: Value) {
    md.retain(|(k, _)| k != key);
    md.push((key.to_string(), value));
}

/// Load `path`, which must fail with a `BadFile` naming it; the problem text.
fn refused(path: &Path) -> String {
    match LlamaPolicy::load(path, 1) {
        Ok(_) => panic!("{} loaded, expected it to be refused", path.display()),
        Err(ModelError::BadFile { path: p, problem }) => {
            assert_eq!(p, path.display().to_string());
            problem
        }
        Err(other) => panic!("{}: expected BadFile, got {other}", path.display()),
    }
}

/// Every feature a Llama GGUF can declare and tilt does not implement is refused at load,
/// naming the file and the key or tensor: never run as a different model.
#[test]
fn undeclared_features_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let w = random_weights(3, vocab().0.len());
    let vocab_size = vocab().0.len();
    type Edit = Box<dyn Fn(&mut Vec<(String, Value)>)>;
    let md_cases: Vec<(&str, Edit, &str)> = vec![
        (
            "yarn",
            Box::new(|md| set(md, "llama.rope.scaling.type", Value::String("yarn".into()))),
            "llama.rope.scaling.type = \"yarn\": RoPE scaling is not supported",
        ),
        (
            "linear-4",
            Box::new(|md| {
                set(md, "llama.rope.scaling.type", Value::String("linear".into()));
                set(md, "llama.rope.scaling.factor", Value::F32(4.0));
            }),
            "llama.rope.scaling.factor = 4: linear RoPE scaling is not supported",
        ),
        (
            // llama.cpp scales linearly by a factor given without a type.
            "factor-without-type",
            Box::new(|md| set(md, "llama.rope.scaling.factor", Value::F32(2.0))),
            "llama.rope.scaling.factor = 2",
        ),
        (
            "old-scale-key",
            Box::new(|md| set(md, "llama.rope.scale_linear", Value::F32(2.0))),
            "llama.rope.scale_linear = 2",
        ),
        (
            "attn-factor",
            Box::new(|md| set(md, "llama.rope.scaling.attn_factor", Value::F32(0.5))),
            "llama.rope.scaling.attn_factor = 0.5",
        ),
        (
            "experts",
            Box::new(|md| {
                set(md, "llama.expert_count", Value::U32(8));
                set(md, "llama.expert_used_count", Value::U32(2));
            }),
            "llama.expert_count = 8: mixture-of-experts models are not supported",
        ),
        (
            "value-length",
            Box::new(|md| set(md, "llama.attention.value_length", Value::U32(2 * HD as u32))),
            "llama.attention.value_length = 16 differs",
        ),
        (
            "key-length",
            Box::new(|md| set(md, "llama.attention.key_length", Value::U32(2 * HD as u32))),
            "llama.attention.key_length = 16 differs",
        ),
        (
            "partial-rope",
            Box::new(|md| set(md, "llama.rope.dimension_count", Value::U32(HD as u32 / 2))),
            "partial rotary embeddings are not supported",
        ),
        (
            "vocab-size",
            Box::new(move |md| {
                set(md, "llama.vocab_size", Value::U32(vocab_size as u32 + 1))
            }),
            "llama.vocab_size = 265 but token_embd.weight has 264 rows",
        ),
        (
            "bidirectional",
            Box::new(|md| set(md, "llama.attention.causal", Value::Bool(false))),
            "metadata key llama.attention.causal is not one tilt's Llama implements",
        ),
        (
            "sliding-window",
            Box::new(|md| set(md, "llama.attention.sliding_window", Value::U32(16))),
            "metadata key llama.attention.sliding_window is not one",
        ),
        (
            "logit-scale",
            Box::new(|md| set(md, "llama.logit_scale", Value::F32(0.5))),
            "metadata key llama.logit_scale is not one",
        ),
        (
            "split",
            Box::new(|md| set(md, "split.count", Value::U16(3))),
            "split.count = 3: this file is one part of a model split into 3 files",
        ),
        (
            "adapter",
            Box::new(|md| set(md, "general.type", Value::String("adapter".into()))),
            "general.type = \"adapter\": not a model",
        ),
        (
            "heads-array",
            Box::new(|md| {
                set(
                    md,
                    "llama.attention.head_count_kv",
                    Value::Array(vec![Value::U32(2); LAYERS]),
                )
            }),
            "llama.attention.head_count_kv should be a non-negative integer, found an array of 2 u32",
        ),
        (
            "pre-qwen2",
            Box::new(|md| set(md, "tokenizer.ggml.pre", Value::String("qwen2".into()))),
            "tokenizer.ggml.pre = \"qwen2\" is not a pre-tokenizer tilt implements",
        ),
        (
            "pre-default",
            Box::new(|md| set(md, "tokenizer.ggml.pre", Value::String("default".into()))),
            "tokenizer.ggml.pre = \"default\" does not say how text is split",
        ),
        (
            "pre-missing",
            Box::new(|md| md.retain(|(k, _)| k != "tokenizer.ggml.pre")),
            "metadata key tokenizer.ggml.pre is missing",
        ),
        (
            "spm",
            Box::new(|md| set(md, "tokenizer.ggml.model", Value::String("llama".into()))),
            "tokenizer.ggml.model = \"llama\" is not supported",
        ),
        (
            "bos-flag-type",
            Box::new(|md| {
                set(md, "tokenizer.ggml.add_bos_token", Value::String("yes".into()))
            }),
            "tokenizer.ggml.add_bos_token should be a bool, found the string \"yes\"",
        ),
    ];
    for (name, edit, expected) in &md_cases {
        let path = dir.path().join(format!("{name}.gguf"));
        write_gguf(&path, &w, edit);
        let problem = refused(&path);
        assert!(problem.contains(expected), "{name}: {problem}");
    }

    // Tensors the file holds but tilt would not use.
    let tensor_cases: [(&str, &str, Vec<usize>, &str); 5] = [
        (
            "bias",
            "blk.0.attn_q.bias",
            vec![D],
            "tensor blk.0.attn_q.bias is not part of the Llama tilt runs",
        ),
        (
            "output-bias",
            "output.bias",
            vec![vocab_size],
            "tensor output.bias is not part",
        ),
        (
            "moe-router",
            "blk.1.ffn_gate_inp.weight",
            vec![4, D],
            "tensor blk.1.ffn_gate_inp.weight is not part",
        ),
        (
            "extra-block",
            "blk.2.attn_norm.weight",
            vec![D],
            "tensor blk.2.attn_norm.weight belongs to block 2, beyond llama.block_count = 2",
        ),
        (
            "rope-freqs",
            "rope_freqs.weight",
            vec![HD / 2],
            "rope_freqs.weight (Llama 3.1 RoPE frequency factors)",
        ),
    ];
    for (name, tensor, shape, expected) in tensor_cases {
        let mut w = random_weights(3, vocab_size);
        let n = shape.iter().product();
        w.tensors.push((tensor.to_string(), shape, vec![0.5; n]));
        let path = dir.path().join(format!("{name}.gguf"));
        write_gguf(&path, &w, |_| {});
        let problem = refused(&path);
        assert!(problem.contains(expected), "{name}: {problem}");
    }
}

/// What a file may declare that changes nothing loads, and runs the same model, bit for
/// bit.
#[test]
fn neutral_declarations_load_and_change_nothing() {
    let t = tiny();
    let base = load(&t, 1);
    let dir = tempfile::tempdir().unwrap();
    let vocab_size = vocab().0.len();
    type Edit = Box<dyn Fn(&mut Vec<(String, Value)>)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "none-type-with-factor",
            // llama.cpp never scales when the type is none, whatever the factor.
            Box::new(|md| {
                set(md, "llama.rope.scaling.type", Value::String("none".into()));
                set(md, "llama.rope.scaling.factor", Value::F32(8.0));
            }),
        ),
        (
            "linear-1",
            Box::new(|md| {
                set(
                    md,
                    "llama.rope.scaling.type",
                    Value::String("linear".into()),
                );
                set(md, "llama.rope.scaling.factor", Value::F32(1.0));
                set(md, "llama.rope.scaling.attn_factor", Value::F32(1.0));
            }),
        ),
        (
            "informational",
            Box::new(move |md| {
                set(md, "llama.vocab_size", Value::U32(vocab_size as u32));
                set(md, "llama.expert_count", Value::U32(0));
                set(md, "llama.attention.key_length", Value::U32(HD as u32));
                set(md, "llama.attention.value_length", Value::U32(HD as u32));
                set(
                    md,
                    "llama.rope.scaling.original_context_length",
                    Value::U32(CTX as u32),
                );
                set(md, "llama.rope.scaling.finetuned", Value::Bool(false));
                set(
                    md,
                    "llama.tensor_data_layout",
                    Value::String("Meta AI original pth".into()),
                );
                set(md, "split.count", Value::U16(1));
                set(md, "general.type", Value::String("model".into()));
            }),
        ),
    ];
    let tokens: Vec<TokenId> = vec![5, 17, 200, 3, 99, 42];
    let (_, expected) = base.prefill(&tokens).unwrap();
    for (name, edit) in &cases {
        let path = dir.path().join(format!("{name}.gguf"));
        write_gguf(&path, &t.weights, edit);
        let p = LlamaPolicy::load(&path, 1).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (_, got) = p.prefill(&tokens).unwrap();
        assert_same(&got, &expected, name);
    }
}

/// Llama 3's pre-tokenizer comes with BPE's `ignore_merges`: a word that is a token is
/// that token even when no merge leads to it (as in Llama 3's tokenizer.json and
/// llama.cpp). Under GPT-2's pre-tokenizer the merges decide. Also: the end-of-sequence
/// ids include `eom_token_id`, and the file's BOS request is reported.
#[test]
fn llama3_pre_tokenizer_ignores_merges_and_eom_ends_a_sequence() {
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    // Replace the last token ("Ġthe", reached by the merge "Ġt he") by "lo", which no
    // merge reaches.
    let lo = vocab().0.len() - 1;
    fn as_pre(md: &mut Vec<(String, Value)>, pre: &str) {
        set(md, "tokenizer.ggml.pre", Value::String(pre.into()));
        let (mut toks, _) = vocab();
        let last = toks.len() - 1;
        toks[last] = "lo".into();
        set(
            md,
            "tokenizer.ggml.tokens",
            Value::Array(toks.into_iter().map(Value::String).collect()),
        );
        let merges = ["h e", "l l", "he ll", "Ġ t"];
        set(
            md,
            "tokenizer.ggml.merges",
            Value::Array(
                merges
                    .iter()
                    .map(|m| Value::String(m.to_string()))
                    .collect(),
            ),
        );
    }
    let llama3 = dir.path().join("llama3.gguf");
    write_gguf(&llama3, &t.weights, |md| {
        as_pre(md, "llama-bpe");
        set(md, "tokenizer.ggml.eom_token_id", Value::U32(0));
    });
    let gpt2 = dir.path().join("gpt2.gguf");
    write_gguf(&gpt2, &t.weights, |md| as_pre(md, "gpt-2"));
    let byte = |c: char| 3 + byte_chars().iter().position(|&b| b == c).unwrap() as TokenId;

    let p = LlamaPolicy::load(&llama3, 1).unwrap();
    assert_eq!(p.encode("lo").unwrap(), vec![lo as TokenId]);
    assert_eq!(
        p.encode("hello").unwrap(),
        vec![lo as TokenId - 2, byte('o')],
        "hell + o"
    );
    assert_eq!(p.eos_token_ids(), &[2, 0]);
    assert!(
        p.tokenizer().adds_bos(),
        "Llama 3 files ask for a BOS unless they say otherwise"
    );

    let p = LlamaPolicy::load(&gpt2, 1).unwrap();
    assert_eq!(p.encode("lo").unwrap(), vec![byte('l'), byte('o')]);
    assert!(!p.tokenizer().adds_bos());

    let no_bos = dir.path().join("llama3-no-bos.gguf");
    write_gguf(&no_bos, &t.weights, |md| {
        as_pre(md, "llama3");
        set(md, "tokenizer.ggml.add_bos_token", Value::Bool(false));
    });
    assert!(!LlamaPolicy::load(&no_bos, 1)
        .unwrap()
        .tokenizer()
        .adds_bos());
}

/// A broken chat template is an error naming the file when the template is loaded, and no
/// obstacle at all when it is not (raw prompts need none); a conversation renders through
/// `Policy::render_chat`.
#[test]
fn a_broken_chat_template_names_the_file_and_is_skipped_without_the_template() {
    let t = tiny();
    let broken = t.path.with_file_name("broken-template.gguf");
    write_gguf(&broken, &t.weights, |md| {
        for (k, v) in md.iter_mut() {
            if k == "tokenizer.chat_template" {
                *v = Value::String("{% for m in messages %}{{ m['content'] }".into());
            }
        }
    });
    let e = LlamaPolicy::load(&broken, 1).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, tilt_models::ModelError::BadFile { .. })
            && msg.contains("broken-template.gguf")
            && msg.contains("chat template"),
        "{msg}"
    );
    let p = LlamaPolicy::load_with(
        &broken,
        tilt_models::LoadOptions {
            threads: 1,
            chat_template: false,
        },
    )
    .unwrap();
    assert!(!p.has_chat_template());
    // Without a template one user message is its own text, anything else is refused.
    assert_eq!(p.chat_prompt("hi").unwrap(), "hi");
    let two = [
        tilt_models::ChatMessage::new(tilt_models::Role::System, "be brief"),
        tilt_models::ChatMessage::user("hi"),
    ];
    assert!(p.render_chat(&two).is_err());
    // With the good template, the conversation is rendered in order, assistant turn opened.
    let good = load(&t, 1);
    assert_eq!(
        good.render_chat(&two).unwrap(),
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}
