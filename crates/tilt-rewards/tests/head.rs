//! Trained heads: the documented safetensors format, checked against hand computation, and
//! every malformed file rejected with a message naming the problem.

use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tilt_rewards::{Head, HeadInput, HeadReward, MiniLmEmbedder, MiniLmRelevance, Reward};

struct T {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &T {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32s(shape: &[usize], v: &[f32]) -> T {
    assert_eq!(shape.iter().product::<usize>(), v.len());
    T {
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn write_head(
    dir: &Path,
    name: &str,
    tensors: Vec<(&str, T)>,
    meta: Option<HashMap<String, String>>,
) -> PathBuf {
    let path = dir.join(name);
    let views: Vec<(&str, &T)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    safetensors::serialize_to_file(views, meta, &path).unwrap();
    path
}

/// A deterministic pseudo-random vector (no RNG crate needed).
fn vector(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed.wrapping_mul(40503));
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

#[test]
fn linear_regression_head_is_w_dot_z_plus_b() {
    let dir = tempfile::tempdir().unwrap();
    let w = vector(384, 1);
    let p = write_head(
        dir.path(),
        "reg.safetensors",
        vec![
            ("weight", f32s(&[1, 384], &w)),
            ("bias", f32s(&[1], &[0.25])),
        ],
        None,
    );
    let head = Head::load(&p).unwrap();
    assert_eq!(head.input(), HeadInput::Response);
    assert_eq!(head.outputs(), 1);
    let z = vector(384, 2);
    let expected = dot64(&w, &z) + 0.25;
    let got = f64::from(head.apply(&z).unwrap());
    assert!(
        (got - expected).abs() < 1e-4 * expected.abs().max(1.0),
        "{got} vs {expected}"
    );
    let e = head.apply(&z[..10]).unwrap_err();
    assert!(
        e.to_string()
            .contains("input has 10 features, the head takes 384"),
        "{e}"
    );
}

#[test]
fn classifier_scores_log_probability_of_the_positive_class() {
    let dir = tempfile::tempdir().unwrap();
    let w: Vec<f32> = [vector(384, 3), vector(384, 4), vector(384, 5)].concat();
    let b = [0.1f32, -0.2, 0.3];
    let z = vector(384, 6);
    // Hand computation in f64.
    let logits: Vec<f64> = (0..3)
        .map(|c| dot64(&w[c * 384..(c + 1) * 384], &z) + f64::from(b[c]))
        .collect();
    let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
    for (meta, class) in [(None, 2usize), (Some("0"), 0), (Some("1"), 1)] {
        let meta = meta.map(|c| HashMap::from([("positive_class".to_string(), c.to_string())]));
        let p = write_head(
            dir.path(),
            "cls.safetensors",
            vec![("weight", f32s(&[3, 384], &w)), ("bias", f32s(&[3], &b))],
            meta,
        );
        let head = Head::load(&p).unwrap();
        assert_eq!(head.positive_class(), class);
        let got = f64::from(head.apply(&z).unwrap());
        let expected = logits[class] - lse;
        assert!(got <= 0.0);
        assert!(
            (got - expected).abs() < 1e-4,
            "class {class}: {got} vs {expected}"
        );
    }
}

#[test]
fn mlp_head_applies_relu_between_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (h, d) = (5usize, 768usize);
    let hw: Vec<f32> = (0..h).flat_map(|k| vector(d, 10 + k as u32)).collect();
    let hb = [0.5f32, -0.5, 0.0, 1.0, -1.0];
    let w = [1.0f32, -2.0, 0.5, 0.25, 3.0];
    let p = write_head(
        dir.path(),
        "mlp.safetensors",
        vec![
            ("hidden.weight", f32s(&[h, d], &hw)),
            ("hidden.bias", f32s(&[h], &hb)),
            ("weight", f32s(&[1, h], &w)),
            ("bias", f32s(&[1], &[-0.75])),
        ],
        None,
    );
    let head = Head::load(&p).unwrap();
    assert_eq!(head.input(), HeadInput::PromptAndResponse);
    let z = vector(d, 99);
    let a: Vec<f64> = (0..h)
        .map(|k| (dot64(&hw[k * d..(k + 1) * d], &z) + f64::from(hb[k])).max(0.0))
        .collect();
    assert!(
        a.contains(&0.0) && a.iter().any(|&x| x > 0.0),
        "ReLU exercised: {a:?}"
    );
    let expected: f64 = a
        .iter()
        .zip(&w)
        .map(|(x, &y)| x * f64::from(y))
        .sum::<f64>()
        - 0.75;
    let got = f64::from(head.apply(&z).unwrap());
    assert!((got - expected).abs() < 1e-3, "{got} vs {expected}");
}

#[test]
fn malformed_heads_are_rejected_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = vector(384, 1);
    type Case<'a> = (
        &'a str,
        Vec<(&'a str, T)>,
        Option<HashMap<String, String>>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "nobias",
            vec![("weight", f32s(&[1, 384], &w))],
            None,
            "missing tensor \"bias\"",
        ),
        (
            "noweight",
            vec![("bias", f32s(&[1], &[0.0]))],
            None,
            "missing tensor \"weight\"",
        ),
        (
            "shape",
            vec![("weight", f32s(&[384], &w)), ("bias", f32s(&[1], &[0.0]))],
            None,
            "tensor weight has shape [384], expected 2 dimensions",
        ),
        (
            "biasshape",
            vec![
                ("weight", f32s(&[1, 384], &w)),
                ("bias", f32s(&[2], &[0.0, 0.0])),
            ],
            None,
            "tensor bias has shape [2], expected [1] to match weight [1, 384]",
        ),
        (
            "width",
            vec![
                ("weight", f32s(&[2, 192], &w)),
                ("bias", f32s(&[2], &[0.0, 0.0])),
            ],
            None,
            "takes 192 inputs",
        ),
        (
            "dtype",
            vec![
                (
                    "weight",
                    T {
                        dtype: Dtype::F64,
                        shape: vec![1, 384],
                        data: vec![0; 384 * 8],
                    },
                ),
                ("bias", f32s(&[1], &[0.0])),
            ],
            None,
            "dtype F64, expected F32",
        ),
        (
            "nan",
            vec![
                ("weight", f32s(&[1, 384], &w)),
                ("bias", f32s(&[1], &[f32::NAN])),
            ],
            None,
            "non-finite",
        ),
        (
            "extra",
            vec![
                ("weight", f32s(&[1, 384], &w)),
                ("bias", f32s(&[1], &[0.0])),
                ("scale", f32s(&[1], &[1.0])),
            ],
            None,
            "unexpected tensor \"scale\"",
        ),
        (
            "hiddenhalf",
            vec![
                ("weight", f32s(&[1, 384], &w)),
                ("bias", f32s(&[1], &[0.0])),
                ("hidden.weight", f32s(&[384, 384], &vec![0.0; 384 * 384])),
            ],
            None,
            "missing tensor \"hidden.bias\"",
        ),
        (
            "class",
            vec![
                ("weight", f32s(&[1, 384], &w)),
                ("bias", f32s(&[1], &[0.0])),
            ],
            Some(HashMap::from([("positive_class".into(), "1".into())])),
            "metadata positive_class = \"1\" is not a class index below 1",
        ),
    ];
    for (name, tensors, meta, expected) in cases {
        let p = write_head(d, &format!("{name}.safetensors"), tensors, meta);
        let err = Head::load(&p).unwrap_err();
        assert!(
            err.is_invalid_input(),
            "{name}: a bad head file is the user's input: {err}"
        );
        let e = err.to_string();
        assert!(e.contains(expected), "{name}: {e}");
        assert!(
            e.contains(&format!("{name}.safetensors")),
            "{name}: error names the file: {e}"
        );
    }
    // Not safetensors at all, truncated, missing.
    let garbage = d.join("garbage.safetensors");
    std::fs::write(&garbage, b"hello").unwrap();
    assert!(Head::load(&garbage)
        .unwrap_err()
        .to_string()
        .contains("not a valid safetensors"));
    let good = write_head(
        d,
        "good.safetensors",
        vec![
            ("weight", f32s(&[1, 384], &w)),
            ("bias", f32s(&[1], &[0.0])),
        ],
        None,
    );
    let bytes = std::fs::read(&good).unwrap();
    let cut = d.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    assert!(Head::load(&cut)
        .unwrap_err()
        .to_string()
        .contains("not a valid safetensors"));
    let err = Head::load(&d.join("absent.safetensors")).unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    let e = err.to_string();
    assert!(
        e.contains("absent.safetensors") && e.contains("cannot read"),
        "{e}"
    );
    for p in [&garbage, &cut] {
        assert!(Head::load(p).unwrap_err().is_invalid_input());
    }
    // Through the spec, as the CLI builds it: invalid input, found before MiniLM loads.
    let spec = tilt_rewards::RewardSpec::parse(&format!(
        "head:{}",
        d.join("absent.safetensors").display()
    ))
    .unwrap();
    let err = spec.build().err().expect("a missing head file");
    assert!(
        err.is_invalid_input() && err.to_string().contains("absent.safetensors"),
        "{err}"
    );
}

fn embedder() -> Arc<MiniLmEmbedder> {
    static E: OnceLock<Arc<MiniLmEmbedder>> = OnceLock::new();
    E.get_or_init(|| Arc::new(MiniLmEmbedder::load_default().expect("load MiniLM")))
        .clone()
}

#[test]
fn head_reward_on_real_embeddings_equals_relevance_plus_bias() {
    // A linear head whose weight row is e(target) scores cos(e(y), e(target)) + bias: the
    // same number as the relevance reward with that target, computed another way.
    let e = embedder();
    let target = "a recipe for bread";
    let t = e.embed(&[target]).unwrap().remove(0);
    let dir = tempfile::tempdir().unwrap();
    let p = write_head(
        dir.path(),
        "target.safetensors",
        vec![
            ("weight", f32s(&[1, 384], &t)),
            ("bias", f32s(&[1], &[0.5])),
        ],
        None,
    );
    let reward = HeadReward::new(e.clone(), Head::load(&p).unwrap()).unwrap();
    assert!(reward.name().starts_with("head:"));
    let pairs = [
        ("p", "Knead the dough and bake it."),
        ("q", "Stocks fell sharply."),
    ];
    let got = reward.score(&pairs).unwrap();
    let rel = MiniLmRelevance::new(e.clone(), Some(target.into()))
        .score(&pairs)
        .unwrap();
    for (g, r) in got.iter().zip(&rel) {
        assert!((g - (r + 0.5)).abs() < 1e-5, "{g} vs {r} + 0.5");
    }
    // Prompt ++ response: weight [e(t), e(t)] scores cos(x, t) + cos(y, t).
    let both = [t.clone(), t.clone()].concat();
    let p2 = write_head(
        dir.path(),
        "both.safetensors",
        vec![
            ("weight", f32s(&[1, 768], &both)),
            ("bias", f32s(&[1], &[0.0])),
        ],
        None,
    );
    let reward2 = HeadReward::new(e.clone(), Head::load(&p2).unwrap()).unwrap();
    let pairs2 = [("Bake bread.", "Knead the dough and bake it.")];
    let got2 = reward2.score(&pairs2).unwrap()[0];
    let rp = MiniLmRelevance::new(e.clone(), Some(target.into()))
        .score(&[("", "Bake bread."), ("", "Knead the dough and bake it.")])
        .unwrap();
    assert!((got2 - (rp[0] + rp[1])).abs() < 1e-5, "{got2} vs {rp:?}");
    assert!(reward2.artifacts().contains(&p2));
    // A shared prompt (embedded once) and a second one, interleaved.
    let pairs3 = [
        ("Bake bread.", "Knead the dough and bake it."),
        ("Sell stocks.", "Knead the dough and bake it."),
        ("Bake bread.", "Stocks fell sharply."),
    ];
    let got3 = reward2.score(&pairs3).unwrap();
    let rel = MiniLmRelevance::new(e.clone(), Some(target.into()));
    for (i, (p, r)) in pairs3.iter().enumerate() {
        let s = rel.score(&[("", p), ("", r)]).unwrap();
        assert!(
            (got3[i] - (s[0] + s[1])).abs() < 1e-5,
            "pair {i}: {} vs {s:?}",
            got3[i]
        );
    }
}
