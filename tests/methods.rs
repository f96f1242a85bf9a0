//! The unlearning methods WGA, SatImp, UNDIAL, CE-U, IdkDPO, RMU, ME, oracle matching and DMM on
//! the llama fixture: each loss equals a hand computation (log-probabilities computed here, on
//! the host, in f64), training moves the model in the intended direction, and unknown parameters
//! are errors naming the key.
mod common;
use candle_core::{DType, Tensor, Var};
use common::*;
use std::path::{Path, PathBuf};
use unlearn::lora::{attach_lora, load_adapter, lora_vars, LoraConfig, TargetModules};
use unlearn::methods::{self, Ctx, LossOutput, Method};
use unlearn::model::{Decoder, ForwardOptions};
use unlearn::recipe::Recipe;
use unlearn::rng::Rng;
use unlearn::tokenizer::ChatTokenizer;
use unlearn::train::batch::{Dataset, ItemBatch, PairedBatch};
use unlearn::train::trainer::{run, RunOptions};

const MAX_LEN: usize = 64;

struct Fx {
    tok: ChatTokenizer,
    model: Decoder,
    vars: Vec<Var>,
    forget: Dataset,
    retain: Dataset,
    pad: u32,
}

/// The llama fixture with an all-linear LoRA (optionally restricted to `layers`) whose B is set
/// to small random values, so that the adapted model differs from the reference.
fn setup(layers: Option<Vec<usize>>) -> Fx {
    let dir = fixture("llama");
    let tok = ChatTokenizer::from_dir(&dir).unwrap();
    let mut model = Decoder::load(&dir, DType::F32, &cpu()).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_rslora: false,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec!["all-linear".into()]),
        layers,
    };
    attach_lora(&mut model, &cfg, &mut Rng::new(1)).unwrap();
    let mut rng = Rng::new(7);
    for (name, var) in lora_vars(&model) {
        if name.ends_with("lora_B.weight") {
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| (0.2 * rng.normal()) as f32)
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &cpu()).unwrap())
                .unwrap();
        }
    }
    let vars = lora_vars(&model).into_iter().map(|(_, v)| v).collect();
    let forget = Dataset::load(&unlearn_data("forget.jsonl"), &tok, MAX_LEN).unwrap();
    let retain = Dataset::load(&unlearn_data("retain.jsonl"), &tok, MAX_LEN).unwrap();
    let pad = tok.pad_token_id().or(tok.eos_token_id()).unwrap_or(0);
    Fx {
        tok,
        model,
        vars,
        forget,
        retain,
        pad,
    }
}

impl Fx {
    fn batch(&self) -> PairedBatch {
        PairedBatch {
            forget: ItemBatch::new(&self.forget, vec![0, 4, 2], self.pad, &cpu()).unwrap(),
            retain: Some(ItemBatch::new(&self.retain, vec![1, 3, 6], self.pad, &cpu()).unwrap()),
        }
    }

    /// Build, prepare and evaluate a method on the fixed batch (LoRA on, no dropout).
    /// The error of a method whose parameters parse but whose `prepare` must fail.
    fn prepare_error(&self, name: &str, params: &str) -> String {
        let mut m = methods::build(name, &toml::from_str(params).unwrap()).unwrap();
        m.prepare(&self.model, &self.forget.examples, self.pad)
            .err()
            .unwrap()
            .to_string()
    }

    fn eval(&self, name: &str, params: &str) -> (Box<dyn Method>, LossOutput) {
        let params: toml::Table = toml::from_str(params).unwrap();
        let mut method = methods::build(name, &params).unwrap();
        method.prepare_text(&self.tok).unwrap();
        method
            .prepare(&self.model, &self.forget.examples, self.pad)
            .unwrap();
        let opts = ForwardOptions::default();
        let ctx = Ctx {
            model: &self.model,
            vars: &self.vars,
            opts: &opts,
            step: 0,
            micro: 0,
        };
        let out = method.loss(&ctx, &self.batch()).unwrap();
        (method, out)
    }
}

// ---- host-side references ------------------------------------------------------------------

type Logits = Vec<Vec<Vec<f64>>>;

fn host_logits(model: &Decoder, batch: &ItemBatch, opts: &ForwardOptions) -> Logits {
    let lg = model.forward(&batch.input(), opts).unwrap();
    lg.to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap()
}

fn trained(model: &Decoder, batch: &ItemBatch) -> Logits {
    host_logits(model, batch, &ForwardOptions::default())
}

fn reference(model: &Decoder, batch: &ItemBatch) -> Logits {
    host_logits(model, batch, &ForwardOptions::base_model())
}

fn labels(batch: &ItemBatch) -> Vec<Vec<i64>> {
    batch.labels.to_vec2::<i64>().unwrap()
}

fn log_softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    z.iter().map(|v| v - lse).collect()
}

fn softmax(z: &[f64]) -> Vec<f64> {
    log_softmax(z).into_iter().map(f64::exp).collect()
}

/// (batch row, position t, gold y = labels[b][t + 1], rank among the row's answer tokens)
fn answer_positions(labels: &[Vec<i64>]) -> Vec<(usize, usize, usize, usize)> {
    let mut out = vec![];
    for (b, row) in labels.iter().enumerate() {
        let mut rank = 0;
        for t in 0..row.len() - 1 {
            if row[t + 1] >= 0 {
                out.push((b, t, row[t + 1] as usize, rank));
                rank += 1;
            }
        }
    }
    out
}

/// CE_t at every answer position.
fn token_ce(logits: &Logits, labels: &[Vec<i64>]) -> Vec<f64> {
    answer_positions(labels)
        .into_iter()
        .map(|(b, t, y, _)| -log_softmax(&logits[b][t])[y])
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// NLL over all answer tokens of the batch, flattened.
fn host_nll(logits: &Logits, labels: &[Vec<i64>]) -> f64 {
    mean(&token_ce(logits, labels))
}

/// ℓ_sum per sequence.
fn seq_sums(logits: &Logits, labels: &[Vec<i64>]) -> Vec<f64> {
    let mut sums = vec![0.0; labels.len()];
    for (b, t, y, _) in answer_positions(labels) {
        sums[b] -= log_softmax(&logits[b][t])[y];
    }
    sums
}

fn log_sigmoid(x: f64) -> f64 {
    -((-x).max(0.0) + (-x.abs()).exp().ln_1p())
}

fn log_value(out: &LossOutput, key: &str) -> f64 {
    out.logs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no log '{key}' in {:?}", out.logs))
}

fn loss_value(out: &LossOutput) -> f64 {
    scalar(&out.loss) as f64
}

fn assert_close(got: f64, want: f64, what: &str) {
    let tol = 1e-4 * want.abs().max(1e-6);
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, hand computation {want} (diff {})",
        (got - want).abs()
    );
}

// ---- (a) loss values against hand computations ----------------------------------------------

#[test]
fn wga_loss_matches_hand_computation() {
    let fx = setup(None);
    let b = fx.batch();
    let ce = token_ce(&trained(&fx.model, &b.forget), &labels(&b.forget));
    let retain = b.retain.as_ref().unwrap();
    let nll_r = host_nll(&trained(&fx.model, retain), &labels(retain));
    let lf = |beta: f64| {
        -mean(
            &ce.iter()
                .map(|c| (-c).exp().powf(beta) * c)
                .collect::<Vec<_>>(),
        )
    };

    // defaults: β = 1, γ = α = 1, retain NLL
    let (m, out) = fx.eval("wga", "");
    assert!(m.needs_retain());
    assert_close(log_value(&out, "forget_loss"), lf(1.0), "wga L_f");
    assert_close(log_value(&out, "retain_loss"), nll_r, "wga L_r");
    assert_close(loss_value(&out), lf(1.0) + nll_r, "wga L");

    let (_, out) = fx.eval("wga", "beta = 2.5\ngamma = 0.5\nalpha = 0.25");
    assert_close(
        loss_value(&out),
        0.5 * lf(2.5) + 0.25 * nll_r,
        "wga L (β 2.5)",
    );
    let (m, out) = fx.eval("wga", "alpha = 0");
    assert!(!m.needs_retain());
    assert_close(loss_value(&out), lf(1.0), "wga L (α 0)");
}

/// KL(uniform ‖ softmax(z)) = −ln V − mean_v log softmax(z)_v
fn kl_from_uniform(z: &[f64]) -> f64 {
    -(z.len() as f64).ln() - mean(&log_softmax(z))
}

/// ME's forget term: KL(uniform ‖ p_θ) averaged over the answer positions.
fn host_me(logits: &Logits, labels: &[Vec<i64>]) -> f64 {
    let kl: Vec<f64> = answer_positions(labels)
        .into_iter()
        .map(|(b, t, _, _)| kl_from_uniform(&logits[b][t]))
        .collect();
    mean(&kl)
}

#[test]
fn me_loss_matches_hand_computation() {
    let fx = setup(None);
    let b = fx.batch();
    let lf = host_me(&trained(&fx.model, &b.forget), &labels(&b.forget));
    assert!(lf > 0.01, "the adapted fixture is not flat: {lf}");
    let retain = b.retain.as_ref().unwrap();
    let nll_r = host_nll(&trained(&fx.model, retain), &labels(retain));

    // defaults: γ = α = 1, retain NLL
    let (m, out) = fx.eval("me", "");
    assert!(m.needs_retain());
    assert_close(log_value(&out, "forget_loss"), lf, "me L_f");
    assert_close(log_value(&out, "retain_loss"), nll_r, "me L_r");
    assert_close(loss_value(&out), lf + nll_r, "me L");
    let (_, out) = fx.eval("me", "gamma = 0.5\nalpha = 3.0");
    assert_close(
        loss_value(&out),
        0.5 * lf + 3.0 * nll_r,
        "me L (γ 0.5, α 3)",
    );
    let (m, out) = fx.eval("me", "alpha = 0");
    assert!(!m.needs_retain());
    assert_close(loss_value(&out), lf, "me L (α 0)");

    // the same forget term inside EUPMU: raw combination L_f + λ₀·L_r
    let (_, out) = fx.eval(
        "eupmu",
        "forget_loss = \"me\"\nlambda_init = 0.7\ncombination = \"raw\"",
    );
    assert_close(log_value(&out, "forget_loss"), lf, "eupmu (me) L_f");
    assert_close(loss_value(&out), lf + 0.7 * nll_r, "eupmu (me) L");
    let params: toml::Table = toml::from_str("forget_loss = \"me\"\nbeta = 0.1").unwrap();
    let e = methods::build("eupmu", &params).err().unwrap().to_string();
    assert!(e.contains("beta") && e.contains("me"), "{e}");
}

#[test]
fn satimp_loss_matches_hand_computation() {
    let fx = setup(None);
    let b = fx.batch();
    let ce = token_ce(&trained(&fx.model, &b.forget), &labels(&b.forget));
    let retain = b.retain.as_ref().unwrap();
    let nll_r = host_nll(&trained(&fx.model, retain), &labels(retain));
    let lf = |b1: f64, b2: f64| {
        -mean(
            &ce.iter()
                .map(|c| {
                    let p = (-c).exp();
                    p.powf(b1) * (1.0 - p).powf(b2) * c
                })
                .collect::<Vec<_>>(),
        )
    };
    // defaults: β1 = 5, β2 = 1, γ = 0.1, α = 1
    let (_, out) = fx.eval("satimp", "");
    assert_close(log_value(&out, "forget_loss"), lf(5.0, 1.0), "satimp L_f");
    assert_close(loss_value(&out), 0.1 * lf(5.0, 1.0) + nll_r, "satimp L");
    let (_, out) = fx.eval(
        "satimp",
        "beta1 = 1.5\nbeta2 = 0.5\ngamma = 2.0\nalpha = 0.5",
    );
    assert_close(
        loss_value(&out),
        2.0 * lf(1.5, 0.5) + 0.5 * nll_r,
        "satimp L (β1 1.5, β2 0.5)",
    );
}

#[test]
fn undial_loss_matches_hand_computation() {
    let fx = setup(None);
    let b = fx.batch();
    let z = trained(&fx.model, &b.forget);
    let z_ref = reference(&fx.model, &b.forget);
    let lf = |beta: f64| {
        let terms: Vec<f64> = answer_positions(&labels(&b.forget))
            .into_iter()
            .map(|(bi, t, y, _)| {
                let mut adj = z_ref[bi][t].clone();
                adj[y] -= beta;
                let q = softmax(&adj);
                let lp = log_softmax(&z[bi][t]);
                -q.iter().zip(&lp).map(|(q, l)| q * l).sum::<f64>()
            })
            .collect();
        mean(&terms)
    };
    // defaults: β = 10, γ = 1, α = 0 (no retain term)
    let (m, out) = fx.eval("undial", "");
    assert!(!m.needs_retain());
    assert_close(loss_value(&out), lf(10.0), "undial L");
    assert!(out.logs.iter().all(|(k, _)| k != "retain_loss"));

    let retain = b.retain.as_ref().unwrap();
    let nll_r = host_nll(&trained(&fx.model, retain), &labels(retain));
    let (m, out) = fx.eval("undial", "beta = 3.0\ngamma = 0.5\nalpha = 2.0");
    assert!(m.needs_retain());
    assert_close(
        loss_value(&out),
        0.5 * lf(3.0) + 2.0 * nll_r,
        "undial L (α 2)",
    );
}

#[test]
fn ceu_loss_matches_hand_computation() {
    let fx = setup(None);
    let b = fx.batch();
    let z = trained(&fx.model, &b.forget);
    let lf = |skip: usize| {
        let terms: Vec<f64> = answer_positions(&labels(&b.forget))
            .into_iter()
            .filter(|p| p.3 >= skip)
            .map(|(bi, t, y, _)| {
                let mut masked = z[bi][t].clone();
                masked[y] = f64::NEG_INFINITY;
                let q = softmax(&masked);
                let lp = log_softmax(&z[bi][t]);
                -q.iter().zip(&lp).map(|(q, l)| q * l).sum::<f64>()
            })
            .collect();
        mean(&terms)
    };
    let (m, out) = fx.eval("ceu", "");
    assert!(!m.needs_retain());
    assert_close(loss_value(&out), lf(1), "ce-u L (skip 1)");
    // the skip matters: skipping none gives a different value
    let (_, out0) = fx.eval("ce-u", "ignore_first_n_answer_tokens = 0");
    assert_close(loss_value(&out0), lf(0), "ce-u L (skip 0)");
    assert!((lf(0) - lf(1)).abs() > 1e-6);
}

#[test]
fn idkdpo_loss_matches_hand_computation() {
    let fx = setup(None);
    let dir = tempfile::tempdir().unwrap();
    let idk = dir.path().join("idk.txt");
    std::fs::write(&idk, "\n  I have no idea.  \n\n").unwrap();

    // y_w built independently: the same questions with the IDK answer, through encode_qa
    let questions: Vec<String> = std::fs::read_to_string(unlearn_data("forget.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["question"].as_str().unwrap().to_string()
        })
        .collect();
    let win_path = dir.path().join("win.jsonl");
    let lines: Vec<String> = questions
        .iter()
        .map(|q| serde_json::json!({"question": q, "answer": "I have no idea."}).to_string())
        .collect();
    std::fs::write(&win_path, lines.join("\n")).unwrap();
    // y_w is not truncated to data.max_length (the forget items are): no truncation here
    let win_ds = Dataset::load(&win_path, &fx.tok, 1024).unwrap();

    let b = fx.batch();
    let win = ItemBatch::new(&win_ds, b.forget.indices.clone(), fx.pad, &cpu()).unwrap();
    let (lw, ll) = (labels(&win), labels(&b.forget));
    let th_w = seq_sums(&trained(&fx.model, &win), &lw);
    let rf_w = seq_sums(&reference(&fx.model, &win), &lw);
    let th_l = seq_sums(&trained(&fx.model, &b.forget), &ll);
    let rf_l = seq_sums(&reference(&fx.model, &b.forget), &ll);
    let retain = b.retain.as_ref().unwrap();
    let nll_r = host_nll(&trained(&fx.model, retain), &labels(retain));
    let lf = |beta: f64| {
        let terms: Vec<f64> = (0..th_w.len())
            .map(|i| {
                let r_w = rf_w[i] - th_w[i];
                let r_l = rf_l[i] - th_l[i];
                log_sigmoid(beta * (r_w - r_l))
            })
            .collect();
        -2.0 / beta * mean(&terms)
    };
    let params = format!("idk_file = {:?}", idk.display().to_string());
    let (_, out) = fx.eval("idkdpo", &params);
    assert_close(log_value(&out, "forget_loss"), lf(0.1), "idkdpo L_f");
    assert_close(loss_value(&out), lf(0.1) + nll_r, "idkdpo L");
    let (_, out) = fx.eval(
        "idkdpo",
        &format!("{params}\nbeta = 0.5\ngamma = 2.0\nalpha = 0.5"),
    );
    assert_close(
        loss_value(&out),
        2.0 * lf(0.5) + 0.5 * nll_r,
        "idkdpo L (β 0.5)",
    );
}

#[test]
fn idkdpo_builds_winners_from_the_prompt_and_a_seeded_answer() {
    let fx = setup(None);
    let build = |params: &str| {
        let mut m =
            methods::idk_dpo::IdkDpo::from_params(&toml::from_str(params).unwrap()).unwrap();
        m.prepare_text(&fx.tok).unwrap();
        m.prepare(&fx.model, &fx.forget.examples, fx.pad).unwrap();
        m
    };
    let bundled = methods::idk_dpo::parse_answers(methods::idk_dpo::DEFAULT_IDK);
    assert!(bundled.len() >= 30, "{} bundled answers", bundled.len());
    let a = build("");
    let again = build("seed = 0");
    let other = build("seed = 5");
    assert_eq!(a.chosen_answers(), again.chosen_answers());
    assert_ne!(a.chosen_answers(), other.chosen_answers());
    for (i, (w, ex)) in a.winners().iter().zip(&fx.forget.examples).enumerate() {
        let prompt = ex.labels.iter().take_while(|&&l| l < 0).count();
        assert_eq!(w.input_ids[..prompt], ex.input_ids[..prompt]);
        assert!(w.labels[..prompt].iter().all(|&l| l == -100));
        let mut answer = fx.tok.encode(a.chosen_answers()[i], false).unwrap();
        answer.push(fx.tok.eos_token_id().unwrap());
        assert_eq!(w.input_ids[prompt..], answer[..]);
        assert!(bundled.iter().any(|b| b == a.chosen_answers()[i]));
    }

    // prepare needs the tokenised answers, and question/answer items
    let mut m = methods::build("idkdpo", &toml::Table::new()).unwrap();
    let e = m
        .prepare(&fx.model, &fx.forget.examples, fx.pad)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("prepare_text"), "{e}");
    m.prepare_text(&fx.tok).unwrap();
    let text = fx.tok.encode_text("just some text", None).unwrap();
    let e = m
        .prepare(&fx.model, &[text], fx.pad)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("question/answer"), "{e}");
    let e = methods::build(
        "idkdpo",
        &toml::from_str("idk_file = \"/nonexistent/idk.txt\"").unwrap(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("/nonexistent/idk.txt"), "{e}");
}

/// c·u/‖u‖ with u_i = the i-th draw of Rng::new(seed), computed here in f64.
fn host_steering(dim: usize, coeff: f64, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    let u: Vec<f64> = (0..dim).map(|_| rng.next_f64()).collect();
    let norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
    u.iter().map(|x| coeff * x / norm).collect()
}

/// Mean over sequences of the masked per-token mean_d squared distance.
fn host_activation_loss(
    h: &Logits,
    target: &dyn Fn(usize, usize) -> Vec<f64>,
    labels: &[Vec<i64>],
) -> f64 {
    let mut per_seq = vec![];
    for (b, row) in labels.iter().enumerate() {
        let (mut sum, mut n) = (0.0, 0usize);
        for (t, &l) in row.iter().enumerate() {
            if l < 0 {
                continue;
            }
            let tgt = target(b, t);
            let d = h[b][t].len();
            sum += h[b][t]
                .iter()
                .zip(&tgt)
                .map(|(x, y)| (x - y).powi(2))
                .sum::<f64>()
                / d as f64;
            n += 1;
        }
        per_seq.push(sum / n as f64);
    }
    mean(&per_seq)
}

fn hidden(model: &Decoder, batch: &ItemBatch, layer: usize, opts: &ForwardOptions) -> Logits {
    model
        .hidden_after_layer(&batch.input(), layer, opts)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec3::<f64>()
        .unwrap()
}

#[test]
fn rmu_loss_matches_hand_computation() {
    let fx = setup(None);
    let b = fx.batch();
    let retain = b.retain.as_ref().unwrap();
    let layer = 1;
    let c = host_steering(64, 2.0, 42);
    let h_f = hidden(&fx.model, &b.forget, layer, &ForwardOptions::default());
    let lf = host_activation_loss(&h_f, &|_, _| c.clone(), &labels(&b.forget));
    let h_r = hidden(&fx.model, retain, layer, &ForwardOptions::default());
    let h_ref = hidden(&fx.model, retain, layer, &ForwardOptions::base_model());
    let lr = host_activation_loss(&h_r, &|bi, t| h_ref[bi][t].clone(), &labels(retain));
    assert!(lr > 0.0, "the adapter must change layer {layer}");
    // defaults c = 2, α = γ = 1, seed 42
    let (m, out) = fx.eval("rmu", "layer = 1");
    assert!(m.needs_retain());
    assert_close(log_value(&out, "forget_loss"), lf, "rmu forget");
    assert_close(log_value(&out, "retain_loss"), lr, "rmu retain");
    assert_close(loss_value(&out), lf + lr, "rmu L");

    let c = host_steering(64, 6.5, 3);
    let lf = host_activation_loss(&h_f, &|_, _| c.clone(), &labels(&b.forget));
    let (_, out) = fx.eval(
        "rmu",
        "layer = 1\nsteering_coeff = 6.5\nseed = 3\ngamma = 0.5\nalpha = 4.0",
    );
    assert_close(loss_value(&out), 0.5 * lf + 4.0 * lr, "rmu L (c 6.5)");
    let v = methods::rmu::steering_vector(64, 2.0, 42);
    let want = host_steering(64, 2.0, 42);
    for (a, b) in v.iter().zip(&want) {
        assert!((*a as f64 - b).abs() < 1e-6);
    }
}

/// RMU's forget term inside the constrained methods: EUPMU's L_f is the steering loss divided by
/// c²/d, its constraint the retain NLL (full forward), combined raw as L_f + λ₀·L_r; surgery logs
/// the same L_f. Steering keys are refused with another forget loss, beta with rmu; a missing
/// layer and adapters above the layer at prepare.
#[test]
fn rmu_forget_loss_inside_eupmu_matches_hand_computation() {
    // adapters up to the steered layer (layer 1 of 2): the forget term reaches every one
    let fx = setup(Some(vec![0, 1]));
    let b = fx.batch();
    let retain = b.retain.as_ref().unwrap();
    let c = host_steering(64, 6.5, 3);
    let h_f = hidden(&fx.model, &b.forget, 1, &ForwardOptions::default());
    // RMU's term divided by c²/d (d = 64)
    let lf =
        host_activation_loss(&h_f, &|_, _| c.clone(), &labels(&b.forget)) * 64.0 / 6.5f64.powi(2);
    let nll_r = host_nll(&trained(&fx.model, retain), &labels(retain));
    let (_, out) = fx.eval(
        "eupmu",
        "forget_loss = \"rmu\"\nlayer = 1\nsteering_coeff = 6.5\nsteering_seed = 3\nlambda_init = 0.7\ncombination = \"raw\"",
    );
    assert_close(log_value(&out, "forget_loss"), lf, "eupmu (rmu) L_f");
    assert_close(log_value(&out, "retain_loss"), nll_r, "eupmu (rmu) L_r");
    assert_close(loss_value(&out), lf + 0.7 * nll_r, "eupmu (rmu) L");
    // the rmu method's defaults: coefficient 2, seed 42
    let c = host_steering(64, 2.0, 42);
    let lf = host_activation_loss(&h_f, &|_, _| c.clone(), &labels(&b.forget)) * 64.0 / 4.0;
    let (_, out) = fx.eval("surgery", "forget_loss = \"rmu\"\nlayer = 1");
    assert_close(log_value(&out, "forget_loss"), lf, "surgery (rmu) L_f");

    let err = |params: &str| {
        methods::build("eupmu", &toml::from_str(params).unwrap())
            .err()
            .unwrap()
            .to_string()
    };
    let e = err("forget_loss = \"npo\"\nlayer = 1");
    assert!(e.contains("layer") && e.contains("\"npo\""), "{e}");
    let e = err("forget_loss = \"rmu\"\nbeta = 0.1");
    assert!(e.contains("beta") && e.contains("rmu"), "{e}");
    let e = err("forget_loss = \"rmu\"\nsteering_coeff = 0.0");
    assert!(e.contains("steering_coeff"), "{e}");
    // retain_loss = "activation": RMU's retain term over the same c²/d, as the constrained loss
    let h_r = hidden(&fx.model, retain, 1, &ForwardOptions::default());
    let h_ref = hidden(&fx.model, retain, 1, &ForwardOptions::base_model());
    let drift = host_activation_loss(&h_r, &|bi, t| h_ref[bi][t].clone(), &labels(retain)) * 16.0;
    assert!(drift > 0.0, "the adapter must change layer 1");
    let lf2 = lf; // c = 2, d = 64: the forget term above
    let (_, out) = fx.eval(
        "eupmu",
        "forget_loss = \"rmu\"\nlayer = 1\nretain_loss = \"activation\"\nlambda_init = 10.0",
    );
    assert_close(
        log_value(&out, "retain_loss"),
        drift,
        "eupmu (rmu) activation L_r",
    );
    assert_close(
        loss_value(&out),
        lf2 + 10.0 * drift,
        "eupmu (rmu, activation) L",
    );
    let e = err("forget_loss = \"npo\"\nretain_loss = \"activation\"");
    assert!(e.contains("activation") && e.contains("rmu"), "{e}");
    let e = fx.prepare_error("eupmu", "forget_loss = \"rmu\"\nlayer = 5");
    assert!(e.contains("layer 5") && e.contains("2 layers"), "{e}");
    let e = setup(None).prepare_error("eupmu", "forget_loss = \"rmu\"\nlayer = 0");
    assert!(
        e.contains("model.layers.1.mlp.down_proj") && e.contains("lora.layers = [0]"),
        "{e}"
    );
}

#[test]
fn rmu_rejects_missing_layers_and_adapters_above_the_layer() {
    let fx = setup(None);
    let mut m = methods::build("rmu", &toml::Table::new()).unwrap();
    let e = m
        .prepare(&fx.model, &fx.forget.examples, fx.pad)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("layer 7") && e.contains("2 layers"), "{e}");
    let mut m = methods::build("rmu", &toml::from_str("layer = 0").unwrap()).unwrap();
    let e = m
        .prepare(&fx.model, &fx.forget.examples, fx.pad)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.layers.1.mlp.down_proj")
            && !e.contains("model.layers.0.")
            && e.contains("lora.layers = [0]"),
        "{e}"
    );
    // adapters only on layer 0: accepted, and every LoRA tensor gets a gradient
    let fx0 = setup(Some(vec![0]));
    let (_, out) = fx0.eval("rmu", "layer = 0");
    let grads = methods::grads_of(&out.loss, &fx0.vars).unwrap();
    assert_eq!(grads.len(), fx0.vars.len());
}

/// `f` on the entries of the teacher's k largest logits (ties: lower index first).
fn on_top_k(k: usize, f: &dyn Fn(&[f64], &[f64]) -> f64, s: &[f64], t: &[f64]) -> f64 {
    let mut idx: Vec<usize> = (0..t.len()).collect();
    idx.sort_by(|&a, &b| t[b].total_cmp(&t[a]).then(a.cmp(&b)));
    idx.truncate(k);
    let s2: Vec<f64> = idx.iter().map(|&i| s[i]).collect();
    let t2: Vec<f64> = idx.iter().map(|&i| t[i]).collect();
    f(&s2, &t2)
}

/// Mean over the batch's non-padding positions of `f(student logits, target logits)`.
fn match_term(
    student: &Decoder,
    batch: &ItemBatch,
    target: &Logits,
    f: &dyn Fn(&[f64], &[f64]) -> f64,
) -> f64 {
    let zs = trained(student, batch);
    let mask = batch.attention_mask.to_vec2::<u32>().unwrap();
    let mut vals = vec![];
    for (bi, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                vals.push(f(&zs[bi][t], &target[bi][t]));
            }
        }
    }
    mean(&vals)
}

/// Mean squared difference of two logit rows.
fn mse_of(s: &[f64], t: &[f64]) -> f64 {
    mean(
        &s.iter()
            .zip(t)
            .map(|(a, b)| (a - b).powi(2))
            .collect::<Vec<_>>(),
    )
}

/// KL(target ‖ student) of two logit rows.
fn kl_of(s: &[f64], t: &[f64]) -> f64 {
    let (ls, lt) = (log_softmax(s), log_softmax(t));
    lt.iter()
        .zip(&ls)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
}

#[test]
fn oracle_loss_matches_hand_computation() {
    let fx = setup(None);
    let teacher_dir = fixture("llama-lora-merged");
    let teacher = Decoder::load(&teacher_dir, DType::F32, &cpu()).unwrap();
    let b = fx.batch();
    let retain = b.retain.as_ref().unwrap();
    // per-position terms over non-padding positions
    let term = |batch: &ItemBatch, f: &dyn Fn(&[f64], &[f64]) -> f64| {
        match_term(&fx.model, batch, &reference(&teacher, batch), f)
    };
    let (mse, kl) = (mse_of, kl_of);
    let teacher_param = format!("teacher = {:?}", teacher_dir.display().to_string());

    let (m, out) = fx.eval("oracle", &teacher_param);
    assert!(m.needs_retain());
    let (f, r) = (term(&b.forget, &mse), term(retain, &mse));
    assert!(f > 0.0);
    assert_close(log_value(&out, "forget_match"), f, "oracle mse forget");
    assert_close(loss_value(&out), f + r, "oracle mse L");

    let (_, out) = fx.eval(
        "oracle",
        &format!("{teacher_param}\nloss = \"kl\"\nretain_weight = 0.5"),
    );
    let (f, r) = (term(&b.forget, &kl), term(retain, &kl));
    assert_close(loss_value(&out), f + 0.5 * r, "oracle kl L");

    let (_, out) = fx.eval("oracle", &format!("{teacher_param}\ntop_k = 5"));
    let t5 = |s: &[f64], t: &[f64]| on_top_k(5, &mse, s, t);
    let (f, r) = (term(&b.forget, &t5), term(retain, &t5));
    assert_close(loss_value(&out), f + r, "oracle mse top-5 L");

    let (m, out) = fx.eval(
        "oracle",
        &format!("{teacher_param}\nloss = \"kl\"\ntop_k = 7\nretain_weight = 0"),
    );
    assert!(!m.needs_retain());
    let k7 = |s: &[f64], t: &[f64]| on_top_k(7, &kl, s, t);
    assert_close(loss_value(&out), term(&b.forget, &k7), "oracle kl top-7 L");
}

/// DMM: s·M(forget) + (1 − s)·M(retain) against targets from a shadow adapter (the model's own
/// base weights with a PEFT adapter switched in) or from an oracle checkpoint.
#[test]
fn dmm_loss_matches_hand_computation() {
    let fx = setup(None);
    let b = fx.batch();
    let retain = b.retain.as_ref().unwrap();
    let shadow_dir = fixture("llama-lora");
    let mut shadow = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    load_adapter(&mut shadow, &shadow_dir).unwrap();
    let oracle_dir = fixture("llama");
    let oracle = Decoder::load(&oracle_dir, DType::F32, &cpu()).unwrap();
    let term = |batch: &ItemBatch, zt: &Logits, f: &dyn Fn(&[f64], &[f64]) -> f64| {
        match_term(&fx.model, batch, zt, f)
    };
    let (mse, kl) = (mse_of, kl_of);
    let shadow_of = |batch: &ItemBatch| host_logits(&shadow, batch, &ForwardOptions::default());
    let (m, out) = fx.eval(
        "dmm",
        &format!("target = \"shadow:{}\"", shadow_dir.display()),
    );
    assert!(m.needs_retain());
    let f = term(&b.forget, &shadow_of(&b.forget), &mse);
    let r = term(retain, &shadow_of(retain), &mse);
    assert!(f > 0.0 && r > 0.0);
    assert_close(log_value(&out, "forget_match"), f, "dmm shadow forget");
    assert_close(log_value(&out, "retain_match"), r, "dmm shadow retain");
    assert_close(loss_value(&out), 0.2 * f + 0.8 * r, "dmm shadow L");

    let oracle_of = |batch: &ItemBatch| reference(&oracle, batch);
    let (_, out) = fx.eval(
        "dmm",
        &format!(
            "target = \"oracle:{}\"\nloss = \"kl\"\nforget_share = 0.5",
            oracle_dir.display()
        ),
    );
    let f = term(&b.forget, &oracle_of(&b.forget), &kl);
    let r = term(retain, &oracle_of(retain), &kl);
    assert_close(loss_value(&out), 0.5 * f + 0.5 * r, "dmm oracle kl L");

    let (m, out) = fx.eval(
        "dmm",
        &format!(
            "target = \"oracle:{}\"\nforget_share = 1.0\ntop_k = 5",
            oracle_dir.display()
        ),
    );
    assert!(!m.needs_retain());
    let t5 = |s: &[f64], t: &[f64]| on_top_k(5, &mse, s, t);
    assert_close(
        loss_value(&out),
        term(&b.forget, &oracle_of(&b.forget), &t5),
        "dmm forget-only top-5 L",
    );

    // retain targets from the starting model (adapter off) instead of the shadow
    let (_, out) = fx.eval(
        "dmm",
        &format!(
            "target = \"shadow:{}\"\nretain_target = \"base\"",
            shadow_dir.display()
        ),
    );
    let f = term(&b.forget, &shadow_of(&b.forget), &mse);
    let r = term(retain, &reference(&fx.model, retain), &mse);
    assert_close(loss_value(&out), 0.2 * f + 0.8 * r, "dmm base-retain L");

    // a missing shadow adapter names the directory
    let e = fx.prepare_error("dmm", "target = \"shadow:/nonexistent/shadow\"");
    assert!(e.contains("/nonexistent/shadow"), "{e}");
}

#[test]
fn oracle_parameter_errors() {
    let fx = setup(None);
    let e = methods::build("oracle", &toml::Table::new())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("teacher"), "{e}");
    let e = fx.prepare_error("oracle", "teacher = \"/nonexistent/teacher\"");
    assert!(e.contains("/nonexistent/teacher"), "{e}");
    let e = methods::build(
        "oracle",
        &toml::from_str("teacher = \"x\"\nloss = \"l1\"").unwrap(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("l1"), "{e}");
    let e = methods::build(
        "oracle",
        &toml::from_str("teacher = \"x\"\ntop_k = 0").unwrap(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("top_k"), "{e}");
}

#[test]
fn unknown_parameters_are_errors_naming_the_key() {
    for name in [
        "wga", "satimp", "undial", "ceu", "idkdpo", "rmu", "oracle", "me",
    ] {
        let mut params: toml::Table = toml::from_str("bogus_knob = 1").unwrap();
        if name == "oracle" {
            params.insert("teacher".into(), toml::Value::String("t".into()));
        }
        let e = methods::build(name, &params).err().unwrap().to_string();
        assert!(e.contains("bogus_knob") && e.contains(name), "{name}: {e}");
        assert!(
            methods::METHODS.iter().any(|m| m.0 == name),
            "{name} not listed"
        );
    }
}

// ---- (b) direction: a few optimizer steps through the trainer ------------------------------

/// Run a tiny recipe and return the output dir.
fn train(dir: &Path, method: &str, steps: usize) -> PathBuf {
    let recipe = format!(
        r#"
[model]
path = {model:?}
[lora]
r = 4
alpha = 8
target_modules = "all-linear"
[data]
forget = {forget:?}
retain = {retain:?}
max_length = {MAX_LEN}
[method]
{method}
[train]
seed = 1
steps = {steps}
batch_size = 3
lr = 1e-2
[output]
dir = {out:?}
"#,
        model = fixture("llama").display().to_string(),
        forget = unlearn_data("forget.jsonl").display().to_string(),
        retain = unlearn_data("retain.jsonl").display().to_string(),
        out = dir.join("out").display().to_string(),
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, recipe).unwrap();
    let recipe = Recipe::load(&path, &[]).unwrap();
    let summary = run(&recipe, &RunOptions::default()).unwrap();
    assert_eq!(summary.steps, steps);
    summary.out_dir
}

/// The base model and the model with the trained adapter.
fn before_after(out: &Path) -> (Decoder, Decoder) {
    let base = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    let mut after = base.clone();
    load_adapter(&mut after, &out.join("adapter")).unwrap();
    (base, after)
}

/// Every forget item in one batch.
fn forget_all() -> ItemBatch {
    let tok = ChatTokenizer::from_dir(&fixture("llama")).unwrap();
    let pad = tok.pad_token_id().or(tok.eos_token_id()).unwrap_or(0);
    let ds = Dataset::load(&unlearn_data("forget.jsonl"), &tok, MAX_LEN).unwrap();
    let idx = (0..ds.len()).collect();
    ItemBatch::new(&ds, idx, pad, &cpu()).unwrap()
}

fn forget_nll_rises(method: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = train(dir.path(), method, 3);
    let (base, after) = before_after(&out);
    let batch = forget_all();
    let l = labels(&batch);
    let before = host_nll(&trained(&base, &batch), &l);
    let now = host_nll(&trained(&after, &batch), &l);
    assert!(now > before + 0.05, "{method}: forget NLL {before} → {now}");
}

#[test]
fn wga_training_raises_the_forget_nll() {
    forget_nll_rises("name = \"wga\"\nalpha = 0");
}

#[test]
fn undial_training_raises_the_forget_nll() {
    forget_nll_rises("name = \"undial\"");
}

#[test]
fn idkdpo_training_raises_the_forget_nll() {
    forget_nll_rises("name = \"idkdpo\"\nalpha = 0");
}

#[test]
fn ceu_training_raises_the_forget_nll() {
    forget_nll_rises("name = \"ceu\"");
}

#[test]
fn me_training_flattens_the_forget_distributions() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(dir.path(), "name = \"me\"\nalpha = 0", 3);
    let (base, after) = before_after(&out);
    let batch = forget_all();
    let l = labels(&batch);
    let before = host_me(&trained(&base, &batch), &l);
    let now = host_me(&trained(&after, &batch), &l);
    assert!(
        now < 0.8 * before,
        "KL(uniform ‖ p) on forget: {before} → {now}"
    );
}

#[test]
fn rmu_training_moves_forget_activations_toward_the_steering_vector() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(
        dir.path(),
        "name = \"rmu\"\nlayer = 1\nsteering_coeff = 2.0",
        3,
    );
    let (base, after) = before_after(&out);
    let batch = forget_all();
    let c = host_steering(64, 2.0, 42);
    let l = labels(&batch);
    let opts = ForwardOptions::default();
    let d0 = host_activation_loss(&hidden(&base, &batch, 1, &opts), &|_, _| c.clone(), &l);
    let d1 = host_activation_loss(&hidden(&after, &batch, 1, &opts), &|_, _| c.clone(), &l);
    assert!(d1 < 0.9 * d0, "distance to c·u: {d0} → {d1}");
}

#[test]
fn oracle_training_brings_logits_closer_to_the_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let teacher_dir = fixture("llama-lora-merged");
    let out = train(
        dir.path(),
        &format!(
            "name = \"oracle\"\nteacher = {:?}",
            teacher_dir.display().to_string()
        ),
        3,
    );
    let (base, after) = before_after(&out);
    let teacher = Decoder::load(&teacher_dir, DType::F32, &cpu()).unwrap();
    let batch = forget_all();
    let zt = reference(&teacher, &batch);
    let mask = batch.attention_mask.to_vec2::<u32>().unwrap();
    let dist = |z: &Logits| {
        let mut vals = vec![];
        for (bi, row) in mask.iter().enumerate() {
            for (t, &m) in row.iter().enumerate() {
                if m == 1 {
                    for (a, b) in z[bi][t].iter().zip(&zt[bi][t]) {
                        vals.push((a - b).powi(2));
                    }
                }
            }
        }
        mean(&vals)
    };
    let d0 = dist(&trained(&base, &batch));
    let d1 = dist(&trained(&after, &batch));
    assert!(d1 < 0.9 * d0, "logit MSE to the teacher: {d0} → {d1}");
}

#[test]
fn rmu_checkpoint_state_records_and_checks_its_settings() {
    let mut m = methods::build("rmu", &toml::from_str("layer = 1").unwrap()).unwrap();
    let state = m.state();
    assert_eq!(state["layer"], 1);
    assert_eq!(state["seed"], 42);
    m.load_state(&state).unwrap();
    let mut other = methods::build("rmu", &toml::from_str("layer = 1\nseed = 3").unwrap()).unwrap();
    let e = other.load_state(&state).err().unwrap().to_string();
    assert!(e.contains("seed 3"), "{e}");
}
