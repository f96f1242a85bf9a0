//! The unlearning engine: method losses against hand computations, directions, EUPMU and
//! explicit surgery properties, determinism, resume, bad recipes.
mod common;
use candle_core::{DType, Tensor, Var};
use common::*;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use unlearn::lora::{attach_lora, lora_vars, LoraConfig, TargetModules};
use unlearn::methods::{self, Ctx};
use unlearn::model::{Decoder, ForwardOptions};
use unlearn::recipe::Recipe;
use unlearn::rng::Rng;
use unlearn::tokenizer::ChatTokenizer;
use unlearn::train::batch::{Dataset, ItemBatch, PairedBatch};
use unlearn::train::trainer::{run, RunOptions};

/// The llama fixture with a LoRA whose B is non-zero, so adapted ≠ reference.
fn adapted_model() -> (Decoder, Vec<Var>) {
    let mut model = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_rslora: false,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec!["all-linear".into()]),
        layers: None,
    };
    attach_lora(&mut model, &cfg, &mut Rng::new(2)).unwrap();
    let mut rng = Rng::new(7);
    for (n, v) in lora_vars(&model) {
        if n.contains("lora_B") {
            let d = v.as_tensor().dims().to_vec();
            let vals: Vec<f32> = (0..d.iter().product::<usize>())
                .map(|_| rng.uniform(-0.2, 0.2) as f32)
                .collect();
            v.set(&Tensor::from_vec(vals, d, &cpu()).unwrap()).unwrap();
        }
    }
    let vars = lora_vars(&model).into_iter().map(|(_, v)| v).collect();
    (model, vars)
}

fn batch(forget_rows: Vec<usize>, retain_rows: Vec<usize>) -> (PairedBatch, Dataset) {
    let tok = ChatTokenizer::from_dir(&fixture("llama")).unwrap();
    let forget = Dataset::load(&unlearn_data("forget.jsonl"), &tok, 64).unwrap();
    let retain = Dataset::load(&unlearn_data("retain.jsonl"), &tok, 64).unwrap();
    let pb = PairedBatch {
        forget: ItemBatch::new(&forget, forget_rows, 2, &cpu()).unwrap(),
        retain: Some(ItemBatch::new(&retain, retain_rows, 2, &cpu()).unwrap()),
    };
    (pb, forget)
}

/// Host-side f64 log-softmax of the model's logits, and per-row lists of (logp of label) for
/// the shifted answer positions. Independent of the library's loss code.
fn answer_logps(model: &Decoder, b: &ItemBatch, lora: bool) -> Vec<Vec<f64>> {
    let opts = if lora {
        ForwardOptions::eval()
    } else {
        ForwardOptions::base_model()
    };
    let logits = model
        .forward(&b.input(), &opts)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let labels = b.labels.to_vec2::<i64>().unwrap();
    logits
        .iter()
        .zip(&labels)
        .map(|(rows, lab)| {
            (0..rows.len() - 1)
                .filter(|&t| lab[t + 1] >= 0)
                .map(|t| {
                    let z: Vec<f64> = rows[t].iter().map(|&x| x as f64).collect();
                    let m = z.iter().cloned().fold(f64::MIN, f64::max);
                    let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                    z[lab[t + 1] as usize] - lse
                })
                .collect()
        })
        .collect()
}

fn method_loss(
    name: &str,
    params: &str,
    model: &Decoder,
    vars: &[Var],
    pb: &PairedBatch,
    forget: &Dataset,
) -> f64 {
    let table: toml::Table = toml::from_str(params).unwrap();
    let mut m = methods::build(name, &table).unwrap();
    m.prepare(model, &forget.examples, 2).unwrap();
    let opts = ForwardOptions::eval();
    let ctx = Ctx {
        model,
        vars,
        opts: &opts,
        step: 0,
        micro: 0,
    };
    let out = m.loss(&ctx, pb).unwrap();
    out.loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn mean_nll(rows: &[Vec<f64>]) -> f64 {
    let all: Vec<f64> = rows.iter().flatten().copied().collect();
    -all.iter().sum::<f64>() / all.len() as f64
}

fn log_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
        "{what}: {a} vs hand-computed {b}"
    );
}

#[test]
fn method_losses_equal_hand_computations() {
    let (model, vars) = adapted_model();
    let (pb, forget) = batch(vec![0, 3, 5], vec![1, 2, 6]);
    let f = answer_logps(&model, &pb.forget, true);
    let f_ref = answer_logps(&model, &pb.forget, false);
    let r = answer_logps(&model, pb.retain.as_ref().unwrap(), true);

    close(
        method_loss("gradascent", "", &model, &vars, &pb, &forget),
        -mean_nll(&f),
        "gradascent",
    );
    close(
        method_loss(
            "graddiff",
            "gamma = 0.5\nalpha = 2.0",
            &model,
            &vars,
            &pb,
            &forget,
        ),
        -0.5 * mean_nll(&f) + 2.0 * mean_nll(&r),
        "graddiff",
    );
    // NPO: −(2/β)·mean log σ(β(ℓ_sum^θ − ℓ_sum^ref)) + retain NLL
    let beta = 0.1;
    let npo_f: f64 = f
        .iter()
        .zip(&f_ref)
        .map(|(a, b)| log_sigmoid(beta * (-a.iter().sum::<f64>() + b.iter().sum::<f64>())))
        .sum::<f64>()
        / f.len() as f64
        * (-2.0 / beta);
    close(
        method_loss("npo", "", &model, &vars, &pb, &forget),
        npo_f + mean_nll(&r),
        "npo",
    );
    // SimNPO: −(2/β)·mean log σ(β(ℓ_sum/|y| − δ)), γ = 0.125, α = 1
    let (beta, delta) = (4.5, 0.5);
    let sim_f: f64 = f
        .iter()
        .map(|a| log_sigmoid(beta * (-a.iter().sum::<f64>() / a.len() as f64 - delta)))
        .sum::<f64>()
        / f.len() as f64
        * (-2.0 / beta);
    close(
        method_loss("simnpo", "delta = 0.5", &model, &vars, &pb, &forget),
        0.125 * sim_f + mean_nll(&r),
        "simnpo",
    );
    // EUPMU raw with λ₀ = 0.7 and a GA forget term: −NLL_f + 0.7·NLL_r; convex divides by 1.7
    let raw = -mean_nll(&f) + 0.7 * mean_nll(&r);
    close(
        method_loss(
            "eupmu",
            "forget_loss = \"ga\"\nlambda_init = 0.7\ncombination = \"raw\"",
            &model,
            &vars,
            &pb,
            &forget,
        ),
        raw,
        "eupmu raw",
    );
    close(
        method_loss(
            "eupmu",
            "forget_loss = \"ga\"\nlambda_init = 0.7\ncombination = \"convex\"",
            &model,
            &vars,
            &pb,
            &forget,
        ),
        raw / 1.7,
        "eupmu convex",
    );
    close(
        method_loss(
            "eupmu",
            "forget_loss = \"npo\"\nlambda_init = 0.7\ncombination = \"log\"",
            &model,
            &vars,
            &pb,
            &forget,
        ),
        0.7 * mean_nll(&r).ln() + (npo_f).ln(),
        "eupmu log",
    );
}

#[test]
fn graddiff_kl_retain_term_is_zero_for_the_reference_and_positive_otherwise() {
    let (model, vars) = adapted_model();
    let (pb, forget) = batch(vec![1, 2], vec![0, 4]);
    let f = answer_logps(&model, &pb.forget, true);
    // GradDiff with KL retain: −NLL_f + KL(ref‖θ); KL > 0 since the adapter changes the model
    let with_kl = method_loss(
        "graddiff",
        "retain_loss = \"kl\"",
        &model,
        &vars,
        &pb,
        &forget,
    );
    let kl = with_kl + mean_nll(&f);
    assert!(kl > 1e-4, "KL to the reference must be positive, got {kl}");
    // With a zero adapter the KL is 0.
    for v in &vars {
        v.set(&v.as_tensor().zeros_like().unwrap()).unwrap();
    }
    let f0 = answer_logps(&model, &pb.forget, true);
    let with_kl0 = method_loss(
        "graddiff",
        "retain_loss = \"kl\"",
        &model,
        &vars,
        &pb,
        &forget,
    );
    assert!(
        (with_kl0 + mean_nll(&f0)).abs() < 1e-5,
        "{}",
        with_kl0 + mean_nll(&f0)
    );
}

#[test]
fn npo_gradient_at_start_equals_summed_ga_gradient() {
    // At Δ = 0 (adapter off ≡ reference), ∇L_f = −2σ(0)·∇ℓ_sum/B = −∇(mean_b ℓ_sum).
    let mut model = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        use_rslora: false,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec!["v_proj".into()]),
        layers: None,
    };
    attach_lora(&mut model, &cfg, &mut Rng::new(0)).unwrap();
    let vars: Vec<Var> = lora_vars(&model).into_iter().map(|(_, v)| v).collect();
    let (pb, forget) = batch(vec![0, 1], vec![0, 1]);
    let table: toml::Table = toml::from_str("alpha = 0.0").unwrap();
    let mut npo = methods::build("npo", &table).unwrap();
    npo.prepare(&model, &forget.examples, 2).unwrap();
    let opts = ForwardOptions::default();
    let ctx = Ctx {
        model: &model,
        vars: &vars,
        opts: &opts,
        step: 0,
        micro: 0,
    };
    let (g_npo, _) = npo.gradients(&ctx, &pb).unwrap();
    let logits = model.forward(&pb.forget.input(), &opts).unwrap();
    let (sums, _) = unlearn::score::row_nll(&logits, &pb.forget.labels).unwrap();
    let ga_sum = sums.mean_all().unwrap().neg().unwrap();
    let g_ga = methods::grads_of(&ga_sum, &vars).unwrap();
    let mut nonzero = 0;
    for (a, b) in g_npo.iter().zip(&g_ga) {
        let d = max_abs_diff(a, b);
        let s = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // lora_A gradients are exactly 0 while B = 0; the B gradients carry the comparison
        assert!(
            d <= 1e-4 * s.max(1e-12),
            "NPO vs GA gradient: {d} (scale {s})"
        );
        nonzero += usize::from(s > 0.0);
    }
    assert_eq!(nonzero, vars.len() / 2, "every lora_B gets a gradient");
}

#[test]
fn surgery_direction_satisfies_the_constraint() {
    let (model, vars) = adapted_model();
    let (pb, forget) = batch(vec![0, 2, 4], vec![3, 5, 7]);
    for tol in [0.0, 0.05] {
        let table: toml::Table =
            toml::from_str(&format!("forget_loss = \"ga\"\ntolerance = {tol}")).unwrap();
        let mut m = methods::build("surgery", &table).unwrap();
        m.prepare(&model, &forget.examples, 2).unwrap();
        let opts = ForwardOptions::default();
        let ctx = Ctx {
            model: &model,
            vars: &vars,
            opts: &opts,
            step: 0,
            micro: 0,
        };
        let (d, logs) = m.gradients(&ctx, &pb).unwrap();
        // independent g_r
        let r = pb.retain.as_ref().unwrap();
        let lr = unlearn::model::ops::causal_lm_loss(
            &model.forward(&r.input(), &opts).unwrap(),
            &r.labels,
        )
        .unwrap();
        let g_r = methods::grads_of(&lr, &vars).unwrap();
        let dot: f64 = d
            .iter()
            .zip(&g_r)
            .map(|(a, b)| {
                (a * b)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            })
            .sum();
        let lambda = logs.iter().find(|(k, _)| k == "lambda").unwrap().1;
        assert!(dot >= -tol - 1e-6, "⟨g_r, d⟩ = {dot} < −ε = {}", -tol);
        if lambda > 0.0 {
            // active constraint: equality
            assert!(
                (dot + tol).abs() < 1e-4 * (1.0 + tol),
                "active constraint: ⟨g_r, d⟩ = {dot}"
            );
        }
    }
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn gradient_ascent_raises_forget_nll_and_graddiff_bounds_retain() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_recipe(tmp.path(), "gradascent", "", "steps = 6\nlr = 1e-2");
    let recipe = Recipe::load(&p, &[]).unwrap();
    run(&recipe, &RunOptions::default()).unwrap();
    let m = metrics(&tmp.path().join("out"));
    let first = m[0]["forget_nll"].as_f64().unwrap();
    let last = m[5]["forget_nll"].as_f64().unwrap();
    assert!(last > first + 0.2, "GA: forget NLL {first} → {last}");

    let tmp2 = tempfile::tempdir().unwrap();
    let p = write_recipe(tmp2.path(), "graddiff", "", "steps = 6\nlr = 1e-2");
    run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default()).unwrap();
    let m = metrics(&tmp2.path().join("out"));
    let r0 = m[0]["retain_loss"].as_f64().unwrap();
    let rmax = m
        .iter()
        .map(|x| x["retain_loss"].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    assert!(
        rmax < r0 + 1.0,
        "GradDiff: retain NLL rose from {r0} to {rmax}"
    );
    let f_last = m[5]["forget_nll"].as_f64().unwrap();
    assert!(
        f_last > m[0]["forget_nll"].as_f64().unwrap(),
        "GradDiff still forgets"
    );
}

#[test]
fn eupmu_lambda_grows_when_retain_rises_and_stays_zero_with_large_tolerance() {
    // Pure GA forget term at a high lr makes the retain loss rise: λ must grow.
    let tmp = tempfile::tempdir().unwrap();
    let p = write_recipe(
        tmp.path(),
        "eupmu",
        "forget_loss = \"ga\"\nlambda_init = 0.0\nlambda_lr = 0.5\nlambda_optimizer = \"ascent\"\ntolerance = 0.0",
        "steps = 5\nlr = 3e-2",
    );
    run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default()).unwrap();
    let m = metrics(&tmp.path().join("out"));
    let rose = m
        .iter()
        .any(|x| x["retain_loss_after"].as_f64().unwrap() > x["retain_loss"].as_f64().unwrap());
    assert!(rose, "the test needs a step where the retain loss rises");
    let lambda_end = m.last().unwrap()["lambda_next"].as_f64().unwrap();
    assert!(lambda_end > 0.0, "λ should grow from 0, got {lambda_end}");
    for x in &m {
        let (before, after, slack) = (
            x["retain_loss"].as_f64().unwrap(),
            x["retain_loss_after"].as_f64().unwrap(),
            x["slack"].as_f64().unwrap(),
        );
        assert!(
            (slack - (before - after)).abs() < 1e-9,
            "δ = L_r_old − L_r_new + 0"
        );
    }

    // Large tolerance: λ stays 0 and the run is pure forget-loss descent, bit for bit.
    let tmp_e = tempfile::tempdir().unwrap();
    let p = write_recipe(
        tmp_e.path(),
        "eupmu",
        "forget_loss = \"ga\"\nlambda_init = 0.0\ntolerance = 1000.0",
        "steps = 3",
    );
    run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default()).unwrap();
    for x in metrics(&tmp_e.path().join("out")) {
        assert_eq!(x["lambda_next"].as_f64().unwrap(), 0.0);
    }
    let tmp_g = tempfile::tempdir().unwrap();
    let p = write_recipe(tmp_g.path(), "gradascent", "", "steps = 3");
    run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default()).unwrap();
    assert_eq!(
        adapter_bytes(&tmp_e.path().join("out")),
        adapter_bytes(&tmp_g.path().join("out"))
    );
}

#[test]
fn eupmu_fast_updates_lambda_without_an_extra_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_recipe(
        tmp.path(),
        "eupmu",
        "forget_loss = \"npo\"\nfast = true\nlambda_init = 1.0",
        "steps = 4",
    );
    run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default()).unwrap();
    let m = metrics(&tmp.path().join("out"));
    assert!(m[0].get("slack").is_none(), "no previous step at step 1");
    assert!(
        m[0].get("retain_loss_after").is_none(),
        "fast: no extra forward"
    );
    // δ at step t+1 = L_r(step t) − L_r(step t+1) + 0
    for w in m.windows(2) {
        let expect = w[0]["retain_loss"].as_f64().unwrap() - w[1]["retain_loss"].as_f64().unwrap();
        assert!((w[1]["slack"].as_f64().unwrap() - expect).abs() < 1e-9);
    }
}

#[test]
fn same_recipe_same_seed_gives_byte_identical_adapters() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let extra = "steps = 3\ngrad_accum = 2";
    for d in [a.path(), b.path()] {
        let p = write_recipe(d, "npo", "", extra);
        run(
            &Recipe::load(&p, &["lora.dropout=0.1".into()]).unwrap(),
            &RunOptions::default(),
        )
        .unwrap();
    }
    assert_eq!(
        adapter_bytes(&a.path().join("out")),
        adapter_bytes(&b.path().join("out"))
    );
    let c = tempfile::tempdir().unwrap();
    let p = write_recipe(c.path(), "npo", "", extra);
    run(
        &Recipe::load(&p, &["lora.dropout=0.1".into(), "train.seed=12".into()]).unwrap(),
        &RunOptions::default(),
    )
    .unwrap();
    assert_ne!(
        adapter_bytes(&a.path().join("out")),
        adapter_bytes(&c.path().join("out"))
    );
}

#[test]
fn interrupted_and_resumed_run_equals_a_straight_run() {
    for (method, extra) in [
        ("eupmu", "forget_loss = \"npo\"\nlambda_lr = 0.3"),
        ("graddiff", "retain_loss = \"kl\""),
    ] {
        let straight = tempfile::tempdir().unwrap();
        let train = "steps = 4\ngrad_accum = 2\nschedule = \"cosine\"\nwarmup_steps = 1\nweight_decay = 0.01";
        let p = write_recipe(straight.path(), method, extra, train);
        let overrides = vec!["lora.dropout=0.1".to_string()];
        run(
            &Recipe::load(&p, &overrides).unwrap(),
            &RunOptions::default(),
        )
        .unwrap();

        let split = tempfile::tempdir().unwrap();
        let p = write_recipe(split.path(), method, extra, train);
        let recipe = Recipe::load(&p, &overrides).unwrap();
        let stop = AtomicBool::new(true); // as if Ctrl-C came during step 1
        let s = run(
            &recipe,
            &RunOptions {
                interrupt: Some(&stop),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(s.interrupted && s.steps == 1);
        assert!(
            !split.path().join("out/adapter").exists(),
            "no final adapter for an interrupted run"
        );
        let s = run(
            &recipe,
            &RunOptions {
                resume: Some(split.path().join("out")),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.steps, 4);
        assert_eq!(
            adapter_bytes(&straight.path().join("out")),
            adapter_bytes(&split.path().join("out")),
            "{method}: resumed adapter differs"
        );
        assert_eq!(
            std::fs::read_to_string(straight.path().join("out/metrics.jsonl")).unwrap(),
            std::fs::read_to_string(split.path().join("out/metrics.jsonl")).unwrap(),
        );
    }
}

#[test]
fn exploding_loss_stops_with_a_clear_error_and_keeps_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_recipe(
        tmp.path(),
        "gradascent",
        "",
        "steps = 50\nlr = 1e30\ncheckpoint_every = 1",
    );
    let err = run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("loss is") || err.contains("gradient norm is"),
        "{err}"
    );
    let ckpts = std::fs::read_dir(tmp.path().join("out/checkpoints"))
        .unwrap()
        .count();
    assert!(ckpts >= 1, "the last good checkpoint stays");
}

#[test]
fn bad_recipes_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // the method and its keys are checked when the recipe loads, before any model does
    let p = write_recipe(tmp.path(), "nosuchmethod", "", "steps = 1");
    let e = Recipe::load(&p, &[]).unwrap_err().to_string();
    assert!(
        e.contains("unknown method 'nosuchmethod'")
            && e.contains("graddiff")
            && e.contains(&p.display().to_string()),
        "{e}"
    );

    let p = write_recipe(tmp.path(), "npo", "betta = 0.2", "steps = 1");
    let e = Recipe::load(&p, &[]).unwrap_err().to_string();
    assert!(
        e.contains("betta") && e.contains(&p.display().to_string()),
        "{e}"
    );

    let p = write_recipe(tmp.path(), "npo", "", "steps = 1\nbatchsize = 3");
    let e = Recipe::load(&p, &[]).unwrap_err().to_string();
    assert!(e.contains("recipe.toml") && e.contains("batchsize"), "{e}");

    let p = write_recipe(tmp.path(), "npo", "", "steps = 1");
    let e = Recipe::load(&p, &["lora.r=0".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora.r"), "{e}");
    let e = Recipe::load(&p, &["train.lr=-1".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.lr"), "{e}");

    let r = Recipe::load(&p, &["data.forget=\"/nonexistent/forget.jsonl\"".into()]).unwrap();
    let e = run(&r, &RunOptions::default()).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/forget.jsonl"), "{e}");

    let e = Recipe::load(
        &p,
        &["eval.suite=\"perplexity\"".into(), "eval.data=[]".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("eval.data"), "{e}");
    let e = Recipe::load(
        &p,
        &[
            "eval.suite=\"tofu\"".into(),
            "eval.data=[\"forget=x\"]".into(),
            "eval.flor=1".into(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("flor"), "{e}");

    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let r = Recipe::load(&p, &[format!("data.retain=\"{}\"", empty.display())]).unwrap();
    let e = run(&r, &RunOptions::default()).unwrap_err().to_string();
    assert!(e.contains("empty.jsonl") && e.contains("no records"), "{e}");
}

#[test]
fn log_sigmoid_value_and_gradient_including_zero() {
    let x = Var::from_tensor(&Tensor::new(&[-100.0f32, -2.0, 0.0, 3.0, 100.0], &cpu()).unwrap())
        .unwrap();
    let y = methods::log_sigmoid(x.as_tensor()).unwrap();
    let g = y
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let yv = y.to_vec1::<f32>().unwrap();
    for (i, &xv) in [-100.0f64, -2.0, 0.0, 3.0, 100.0].iter().enumerate() {
        let expect = -(1.0 + (-xv).exp()).ln();
        let sig_neg = 1.0 / (1.0 + xv.exp());
        assert!((yv[i] as f64 - expect).abs() < 1e-5, "value at {xv}");
        assert!(
            (g[i] as f64 - sig_neg).abs() < 1e-6,
            "gradient at {xv}: {} vs {sig_neg}",
            g[i]
        );
    }
}

#[test]
fn keep_checkpoints_prunes_older_checkpoints_and_resume_still_works() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_recipe(
        tmp.path(),
        "graddiff",
        "",
        "steps = 5\ncheckpoint_every = 1\nkeep_checkpoints = 2",
    );
    run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default()).unwrap();
    let root = tmp.path().join("out/checkpoints");
    let mut left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["step-000004", "step-000005"]);
    // resuming a finished run finds the latest checkpoint and has nothing left to do
    let s = run(
        &Recipe::load(&p, &[]).unwrap(),
        &RunOptions {
            resume: Some(tmp.path().join("out")),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.steps, 5);
}

#[test]
fn evaluation_during_the_run_logs_summaries_and_selects_the_best_step() {
    let tmp = tempfile::tempdir().unwrap();
    let eval = format!(
        "[eval]\nsuite = \"perplexity\"\ndata = [\"forget={}\", \"retain={}\"]\nevery = 2\nselect = \"forget_nll\"\n",
        unlearn_data("forget.jsonl").display(),
        unlearn_data("retain.jsonl").display()
    );
    let p = write_recipe_with(tmp.path(), "gradascent", "", "steps = 4\nlr = 1e-2", &eval);
    run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default()).unwrap();
    let out = tmp.path().join("out");
    let evals: Vec<(u64, f64)> = metrics(&out)
        .iter()
        .filter(|l| l.get("eval").is_some())
        .map(|l| {
            (
                l["step"].as_u64().unwrap(),
                l["eval"]["forget_nll"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 2, 4]);
    for (step, nll) in &evals {
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("evals/step-{step:06}/SUMMARY.json")))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(summary["forget_nll"].as_f64().unwrap(), *nll);
    }
    assert!(
        evals[2].1 > evals[0].1,
        "gradient ascent raises the forget NLL: {evals:?}"
    );
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best.json")).unwrap()).unwrap();
    let argmax = evals.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(best["step"].as_u64().unwrap(), argmax.0);
    assert_eq!(best["value"].as_f64().unwrap(), argmax.1);
    assert!(
        out.join(format!("checkpoints/step-{:06}", 2)).exists(),
        "evaluated steps are checkpointed"
    );
    // a fresh, shorter run into the same directory leaves no evaluation of the old one behind
    let p = write_recipe_with(tmp.path(), "gradascent", "", "steps = 2\nlr = 1e-2", &eval);
    run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default()).unwrap();
    let mut steps: Vec<String> = std::fs::read_dir(out.join("evals"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    steps.sort();
    assert_eq!(steps, vec!["step-000000", "step-000002"]);
    // …nor its later checkpoints, which `--resume` would continue and pruning would prefer
    assert!(!out.join("checkpoints/step-000004").exists());
    assert!(out.join("checkpoints/step-000002").exists());
    // …nor its step-0 evaluation when this run does not evaluate before training
    let no_before = eval.replace("every = 2", "every = 2\nbefore = false");
    let p = write_recipe_with(
        tmp.path(),
        "gradascent",
        "",
        "steps = 2\nlr = 1e-2",
        &no_before,
    );
    run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default()).unwrap();
    let steps: Vec<String> = std::fs::read_dir(out.join("evals"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(steps, vec!["step-000002"]);
}

#[test]
fn diverged_weights_are_never_written() {
    // one step at an absurd rate overflows the weights before any loss is NaN
    let tmp = tempfile::tempdir().unwrap();
    let p = write_recipe(
        tmp.path(),
        "graddiff",
        "",
        "steps = 1\nlr = 1e38\nmax_grad_norm = 1e30",
    );
    let e = run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN or infinite") && e.contains("step 1"), "{e}");
    let out = tmp.path().join("out");
    assert!(!out.join("adapter").exists());
    assert!(!out.join("checkpoints/step-000001").exists());
}

#[test]
fn resume_refuses_a_changed_adapter_or_a_finished_run() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_recipe(
        tmp.path(),
        "graddiff",
        "",
        "steps = 2\ncheckpoint_every = 1",
    );
    run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default()).unwrap();
    let out = tmp.path().join("out");
    let resume = |overrides: &[&str]| {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let opts = RunOptions {
            resume: Some(out.join("checkpoints/step-000002")),
            ..RunOptions::default()
        };
        run(&Recipe::load(&p, &overrides).unwrap(), &opts)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let e = resume(&["lora.alpha=16"]).unwrap_err();
    assert!(
        e.contains("adapter_config.json") && e.contains("lora.alpha"),
        "{e}"
    );
    let other = fixture("llama-tied").display().to_string();
    let e = resume(&[&format!("model.path=\"{other}\"")]).unwrap_err();
    assert!(
        e.contains("trained on") || e.contains("does not match"),
        "{e}"
    );
    let e = resume(&["train.steps=1"]).unwrap_err();
    assert!(e.contains("at step 2, past the recipe's 1 steps"), "{e}");
    resume(&["train.steps=3"]).unwrap();
}

#[test]
fn a_fresh_run_clears_what_an_earlier_run_left_in_its_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for stale in ["merged", "evals/step-000007", "plots"] {
        std::fs::create_dir_all(out.join(stale)).unwrap();
    }
    let p = write_recipe(tmp.path(), "graddiff", "", "steps = 1");
    run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default()).unwrap();
    assert!(out.join("adapter/adapter_model.safetensors").exists());
    for stale in ["merged", "evals", "plots"] {
        assert!(
            !out.join(stale).exists(),
            "{stale} is left from another run"
        );
    }
}

#[test]
fn a_selection_key_the_evaluation_lacks_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let eval = format!(
        "[eval]\nsuite = \"perplexity\"\ndata = [\"forget={}\"]\nevery = 1\nselect = \"forget_nl\"\n",
        unlearn_data("forget.jsonl").display(),
    );
    let p = write_recipe_with(tmp.path(), "gradascent", "", "steps = 1", &eval);
    let e = run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("eval.select 'forget_nl'") && e.contains("forget_nll"),
        "{e}"
    );
}

#[test]
fn a_bad_eval_section_fails_before_the_output_dir_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such.jsonl");
    let eval = format!(
        "[eval]\nsuite = \"perplexity\"\ndata = [\"forget={}\"]\nevery = 1\n",
        missing.display()
    );
    let p = write_recipe_with(tmp.path(), "gradascent", "", "steps = 1", &eval);
    let e = run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
    assert!(!tmp.path().join("out").exists(), "nothing written");
    let p = write_recipe_with(
        tmp.path(),
        "gradascent",
        "",
        "steps = 1",
        &eval.replace("perplexity", "no-such-suite"),
    );
    assert!(run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default()).is_err());
    assert!(!tmp.path().join("out").exists(), "nothing written");
}

#[test]
fn a_batch_larger_than_the_data_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    // forget.jsonl has 6 examples
    let p = write_recipe(tmp.path(), "graddiff", "", "steps = 1\nbatch_size = 7");
    let p = {
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("batch_size = 2\n", "");
        std::fs::write(&p, text).unwrap();
        p
    };
    let e = run(&Recipe::load(&p, &[]).unwrap(), &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.batch_size 7 is larger than the 6 examples of")
            && e.contains("forget.jsonl")
            && e.contains("at most 6"),
        "{e}"
    );
}
