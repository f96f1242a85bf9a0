//! `unlearn attribute` on the bundled tiny target: the shadow adapter it writes is a PEFT adapter
//! whose A rows are orthonormal (the forget gradient's top singular directions), whose step the
//! auto scale sized so that the forget NLL equals the NLL of never-seen people, and which
//! reproduces, when loaded back, the NLL the report states. With reference models the report adds
//! the KL of their mean to the oracle (checked by identities). Bad recipes are errors naming the
//! key.
mod common;
use candle_core::DType;
use common::*;
use std::path::{Path, PathBuf};
use unlearn::lora::load_adapter;
use unlearn::model::{Decoder, ForwardOptions};
use unlearn::recipe::AttributeRecipe;
use unlearn::score::score_examples;
use unlearn::tokenizer::ChatTokenizer;
use unlearn::train::batch::Dataset;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The first `n` lines of a bundled data file, copied into `dir`.
fn head(dir: &Path, name: &str, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(repo(&format!("data/tofu/{name}"))).unwrap();
    let out = dir.join(name);
    let lines: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(&out, lines.join("\n") + "\n").unwrap();
    out
}

fn recipe(dir: &Path, extra: &str) -> PathBuf {
    let forget = head(dir, "forget10.jsonl", 20);
    let retain = head(dir, "retain90.jsonl", 40);
    let holdout = head(dir, "holdout.jsonl", 20);
    let text = format!(
        r#"
[model]
path = {model:?}

[subspace]
r = 4
target_modules = ["q_proj", "v_proj", "down_proj"]

[data]
forget = {forget:?}
retain = [{retain:?}]
calibrate = {holdout:?}
max_length = 128

[attribute]
estimator = "cg"
compare = ["diagonal"]
curvature = "logits"
samples = 16
damping = 0.1
cg_iters = 200
cg_tol = 1e-6
batch_size = 32
{extra}

[report]
oracle = {oracle:?}
data = ["forget={forget}", "holdout={holdout}"]

[output]
dir = {out:?}
"#,
        model = repo("data/models/target").display().to_string(),
        oracle = repo("data/models/retain").display().to_string(),
        forget = forget.display(),
        retain = retain.display().to_string(),
        holdout = holdout.display(),
        out = dir.join("run").display().to_string(),
    );
    let path = dir.join("attribute.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn mean_nll(model: &Decoder, examples: &Dataset, opts: &ForwardOptions) -> f64 {
    let rows = score_examples(model, &examples.examples, 32, 0, opts, |_| {}).unwrap();
    let tokens: usize = rows.iter().map(|r| r.tokens).sum();
    rows.iter().map(|r| r.sum_nll).sum::<f64>() / tokens as f64
}

#[test]
fn shadow_adapter_is_calibrated_and_reloads() {
    let tmp = tempfile::tempdir().unwrap();
    let path = recipe(tmp.path(), "");
    let r = AttributeRecipe::load(&path, &[]).unwrap();
    let report = unlearn::attribute::run(&r, &cpu(), false).unwrap();
    // rank 4 on q, v and down of 4 layers: Σ out·r = 4·(192 + 192 + 192)·4
    let influence = report.influence.as_ref().unwrap();
    assert_eq!(influence.modules, 12);
    assert_eq!(influence.parameters, 4 * 3 * 192 * 4);
    assert_eq!(influence.curvature_samples, 16);
    assert!(report.simulated.is_none());
    assert_eq!(report.estimators.len(), 2);
    let cg = &report.estimators[0];
    assert_eq!(cg.estimator, "cg");
    assert!(cg.solves[0].relative_residual < 1e-6, "{:?}", cg.solves);
    let goal = cg.calibrate_nll.unwrap();
    // the target has memorised forget10 and never saw the holdout people
    assert!(cg.forget_nll_before < 0.1 && goal > 1.0, "{cg:?}");
    assert!(
        (cg.forget_nll_after - goal).abs() < 0.01 * goal,
        "auto scale: {} vs {goal}",
        cg.forget_nll_after
    );
    for e in &report.estimators {
        let forget = &e.splits[0];
        assert_eq!(forget.split, "forget");
        assert_eq!(forget.items, 20);
        assert!(forget.kl_target_oracle > 0.5 && forget.kl_shadow_oracle.is_finite());
        // no report.references: no retraining floor
        assert!(e.splits.iter().all(|sp| sp.kl_references_oracle.is_none()));
    }

    // the saved adapter: A rows orthonormal, and loading it reproduces the reported NLL
    let shadow_dir = tmp.path().join("run/shadow");
    let tok = ChatTokenizer::from_dir(&repo("data/models/target")).unwrap();
    let forget = Dataset::load(&tmp.path().join("forget10.jsonl"), &tok, 128).unwrap();
    let mut model = Decoder::load(&repo("data/models/target"), DType::F32, &cpu()).unwrap();
    let cfg = load_adapter(&mut model, &shadow_dir).unwrap();
    assert_eq!((cfg.r, cfg.alpha), (4, 4.0));
    for lin in model.linears() {
        if let Some(l) = &lin.lora {
            let a = l.a.as_tensor();
            let gram = a.matmul(&a.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            for (i, row) in gram.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((v - want).abs() < 1e-4, "{}: AAᵀ[{i}][{j}] = {v}", lin.name);
                }
            }
        }
    }
    let reloaded = mean_nll(&model, &forget, &ForwardOptions::eval());
    assert!(
        (reloaded - cg.forget_nll_after).abs() < 1e-4,
        "{reloaded} vs {}",
        cg.forget_nll_after
    );
    let base = mean_nll(&model, &forget, &ForwardOptions::base_model());
    assert!((base - cg.forget_nll_before).abs() < 1e-5);
    assert!(tmp.path().join("run/report.json").is_file());
    assert!(tmp.path().join("run/report.md").is_file());
}

#[test]
fn bad_attribute_recipes_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let path = recipe(tmp.path(), "");
    let err = |set: &[&str]| {
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        AttributeRecipe::load(&path, &set)
            .err()
            .unwrap()
            .to_string()
    };
    let e = err(&["attribute.curvature=\"hessian\""]);
    assert!(
        e.contains("attribute.curvature") && e.contains("attribute.toml"),
        "{e}"
    );
    let e = err(&["attribute.damping=0"]);
    assert!(e.contains("attribute.damping"), "{e}");
    let e = err(&["attribute.scale=\"big\""]);
    assert!(e.contains("attribute.scale"), "{e}");
    let e = err(&["attribute.estimator=\"kfac\""]);
    assert!(e.contains("kfac"), "{e}");
    let e = err(&["attribute.bogus=1"]);
    assert!(e.contains("bogus"), "{e}");
    // auto scale without unseen items to calibrate on
    let text = std::fs::read_to_string(&path).unwrap();
    let no_cal: String = text
        .lines()
        .filter(|l| !l.starts_with("calibrate"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&path, no_cal).unwrap();
    let e = AttributeRecipe::load(&path, &[]).err().unwrap().to_string();
    assert!(e.contains("data.calibrate"), "{e}");
    // a missing forget file is named when the run starts
    let r = AttributeRecipe::load(
        &path,
        &[
            "attribute.scale=2.0".into(),
            "data.forget=\"/nonexistent/f.jsonl\"".into(),
        ],
    )
    .unwrap();
    let e = unlearn::attribute::run(&r, &cpu(), false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/nonexistent/f.jsonl"), "{e}");
}

#[test]
fn reference_models_give_the_retraining_floor() {
    let tmp = tempfile::tempdir().unwrap();
    let path = recipe(tmp.path(), "");
    let target = repo("data/models/target").display().to_string();
    let oracle = repo("data/models/retain").display().to_string();
    let run = |refs: &str| {
        let set = [format!("report.references={refs}")];
        let r = AttributeRecipe::load(&path, &set).unwrap();
        unlearn::attribute::run(&r, &cpu(), false).unwrap()
    };
    // the mean of one model is that model: its KL to the oracle is the target's
    let one = run(&format!("[{target:?}]"));
    for sp in &one.estimators[0].splits {
        let floor = sp.kl_references_oracle.unwrap();
        assert!(
            (floor - sp.kl_target_oracle).abs() < 1e-4 * sp.kl_target_oracle,
            "{}: {floor} vs {}",
            sp.split,
            sp.kl_target_oracle
        );
    }
    // mixing in the oracle itself: KL(½p + ½q ‖ q) ≤ ½·KL(p ‖ q) by convexity, and > 0
    let two = run(&format!("[{target:?}, {oracle:?}]"));
    for sp in &two.estimators[0].splits {
        let floor = sp.kl_references_oracle.unwrap();
        assert!(
            floor > 0.0 && floor <= 0.5 * sp.kl_target_oracle,
            "{}: {floor} vs {}",
            sp.split,
            sp.kl_target_oracle
        );
    }
    let md = std::fs::read_to_string(tmp.path().join("run/report.md")).unwrap();
    assert!(md.contains("KL(references‖oracle)"), "{md}");
    // a reference that does not exist is named
    let set = ["report.references=[\"/nonexistent/model\"]".to_string()];
    let r = AttributeRecipe::load(&path, &set).unwrap();
    let e = unlearn::attribute::run(&r, &cpu(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/model"), "{e}");
}

/// The full-rank simulated shadow of `tuned` on `base` (no randomness involved).
fn exact_shadow(
    base: &Decoder,
    tuned: &Decoder,
) -> (
    Decoder,
    unlearn::lora::LoraConfig,
    unlearn::attribute::simulated::Drops,
) {
    let mut unused = unlearn::rng::Rng::new(0);
    unlearn::attribute::simulated::shadow_adapter(base, tuned, None, &mut unused).unwrap()
}

/// `base` (a tied model) with `delta(W)` added to every linear weight and the embedding.
fn changed(
    base: &Decoder,
    mut delta: impl FnMut(&candle_core::Tensor) -> candle_core::Tensor,
) -> Decoder {
    let mut tuned = base.clone();
    for lin in tuned.linears_mut() {
        lin.weight = (&lin.weight + delta(&lin.weight)).unwrap();
    }
    tuned.embed = (&tuned.embed + delta(&tuned.embed)).unwrap();
    assert!(tuned.cfg.tie_word_embeddings);
    tuned.lm_head.weight = tuned.embed.clone();
    tuned
}

/// `base` with every linear weight and the (tied) embedding moved by seeded noise of size `eps`.
fn perturbed(base: &Decoder, eps: f64) -> Decoder {
    let mut rng = unlearn::rng::Rng::new(7);
    changed(base, |t| {
        let v: Vec<f32> = (0..t.elem_count())
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect();
        let d = candle_core::Tensor::from_vec(v, t.shape(), t.device()).unwrap();
        (d * eps).unwrap()
    })
}

#[test]
fn simulated_shadow_adapter_reproduces_the_changed_weights_exactly() {
    // a tied, GQA model: k/v (64 → 32) and down (128 → 64) take B = I, q/o/gate/up and the
    // head A = I, the embedding PEFT's transposed layout
    let base = Decoder::load(&fixture("llama-tied"), DType::F32, &cpu()).unwrap();
    let tuned = perturbed(&base, 0.05);
    let (shadow, cfg, drops) = exact_shadow(&base, &tuned);
    assert_eq!(cfg.r, 64, "the largest min(in, out) is the hidden size");
    assert_eq!((cfg.alpha, drops.modules), (64.0, 2 * 7 + 2));
    assert!(drops.dropped.is_empty() && drops.dropped_norm == 0.0);
    let ids = candle_core::Tensor::new(&[[0u32, 5, 9, 17, 33, 40, 2, 7]], &cpu()).unwrap();
    let input = unlearn::model::ModelInput::new(&ids, None);
    let want = tuned
        .forward(&input, &ForwardOptions::base_model())
        .unwrap();
    let got = shadow.forward(&input, &ForwardOptions::eval()).unwrap();
    let plain = base.forward(&input, &ForwardOptions::base_model()).unwrap();
    assert!(
        max_abs_diff(&plain, &want) > 0.1,
        "the perturbation matters"
    );
    assert!(
        max_abs_diff(&got, &want) < 1e-4,
        "{}",
        max_abs_diff(&got, &want)
    );
    // as a PEFT directory and back
    let dir = tempfile::tempdir().unwrap();
    unlearn::lora::save_adapter(&shadow, &cfg, dir.path(), None).unwrap();
    let mut again = base.clone();
    load_adapter(&mut again, dir.path()).unwrap();
    let back = again.forward(&input, &ForwardOptions::eval()).unwrap();
    assert_eq!(max_abs_diff(&back, &got), 0.0);
    // ‖Δ‖ counts the tied matrix once
    let sq = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let mut want_sq = sq(&tuned.embed, &base.embed);
    for (t, b) in tuned.linears().iter().zip(base.linears()) {
        want_sq += sq(&t.weight, &b.weight);
    }
    assert!((drops.carried_norm - want_sq.sqrt()).abs() < 1e-3 * want_sq.sqrt());
}

/// `base` with a rank-2 change u₁v₁ᵀ + u₂v₂ᵀ (seeded, entries of size `eps`) on every linear
/// weight and the tied embedding.
fn low_rank_change(base: &Decoder, eps: f64) -> Decoder {
    let mut rng = unlearn::rng::Rng::new(11);
    changed(base, |t| {
        let (m, n) = t.dims2().unwrap();
        let mut draw = |len: usize| {
            let v: Vec<f32> = (0..2 * len).map(|_| rng.normal() as f32).collect();
            candle_core::Tensor::from_vec(v, (len, 2), &cpu()).unwrap()
        };
        let (u, v) = (draw(m), draw(n));
        (u.matmul(&v.t().unwrap()).unwrap() * eps).unwrap()
    })
}

#[test]
fn simulated_shadow_at_a_rank_keeps_the_leading_directions() {
    use unlearn::attribute::simulated::shadow_adapter;
    let base = Decoder::load(&fixture("llama-tied"), DType::F32, &cpu()).unwrap();
    let tuned = low_rank_change(&base, 0.02);
    let ids = candle_core::Tensor::new(&[[0u32, 5, 9, 17, 33, 40, 2, 7]], &cpu()).unwrap();
    let input = unlearn::model::ModelInput::new(&ids, None);
    let want = tuned
        .forward(&input, &ForwardOptions::base_model())
        .unwrap();
    let plain = base.forward(&input, &ForwardOptions::base_model()).unwrap();
    assert!(max_abs_diff(&plain, &want) > 0.1, "the change matters");
    let rng = || unlearn::rng::Rng::new(3);
    let (_, _, exact) = exact_shadow(&base, &tuned);

    // rank 4 ≥ the change's rank 2: nothing is cut, the logits are the tuned model's
    let (shadow, cfg, drops) = shadow_adapter(&base, &tuned, Some(4), &mut rng()).unwrap();
    assert_eq!((cfg.r, cfg.alpha, drops.rank), (4, 4.0, 4));
    let got = shadow.forward(&input, &ForwardOptions::eval()).unwrap();
    assert!(
        max_abs_diff(&got, &want) < 1e-3,
        "{}",
        max_abs_diff(&got, &want)
    );
    assert!(
        drops.truncated_norm < 1e-4 * exact.carried_norm,
        "{drops:?}"
    );
    assert!((drops.carried_norm - exact.carried_norm).abs() < 1e-4 * exact.carried_norm);
    assert_eq!(exact.truncated_norm, 0.0);

    // rank 1: half of each change is cut, the two parts add up to the whole (Pythagoras)
    let (shadow, cfg, drops) = shadow_adapter(&base, &tuned, Some(1), &mut rng()).unwrap();
    assert_eq!(cfg.r, 1);
    let whole = exact.carried_norm.powi(2);
    let parts = drops.carried_norm.powi(2) + drops.truncated_norm.powi(2);
    assert!((parts - whole).abs() < 1e-3 * whole, "{parts} vs {whole}");
    assert!(drops.truncated_norm > 0.2 * exact.carried_norm, "{drops:?}");
    // as a PEFT directory of rank 1 and back
    let dir = tempfile::tempdir().unwrap();
    unlearn::lora::save_adapter(&shadow, &cfg, dir.path(), None).unwrap();
    let mut again = base.clone();
    let loaded = load_adapter(&mut again, dir.path()).unwrap();
    assert_eq!(loaded.r, 1);
    let cut = shadow.forward(&input, &ForwardOptions::eval()).unwrap();
    let back = again.forward(&input, &ForwardOptions::eval()).unwrap();
    assert_eq!(max_abs_diff(&back, &cut), 0.0);
    // the cut shadow sits between the base model and the tuned one
    let d_plain = max_abs_diff(&plain, &want);
    let d_cut = max_abs_diff(&cut, &want);
    assert!(d_cut < d_plain, "{d_cut} vs {d_plain}");
}

#[test]
fn simulated_estimator_fine_tunes_and_reports_its_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let path = recipe(tmp.path(), "");
    let set = [
        "attribute.estimator=\"simulated\"".to_string(),
        "attribute.compare=[\"identity\"]".to_string(),
        "simulate.epochs=1".to_string(),
        "simulate.batch_size=8".to_string(),
        "simulate.lr=1e-3".to_string(),
    ];
    let r = AttributeRecipe::load(&path, &set).unwrap();
    let report = unlearn::attribute::run(&r, &cpu(), false).unwrap();
    let sim = report.simulated.as_ref().unwrap();
    assert_eq!(sim.steps, 5, "40 retain items, batch 8, one epoch");
    assert_eq!(sim.adapter.rank, 192);
    // everything but the norm weights is carried; they changed too, a little
    assert!(
        sim.adapter
            .dropped
            .iter()
            .all(|n| n.ends_with("norm.weight")),
        "{:?}",
        sim.adapter.dropped
    );
    assert!(
        sim.adapter.dropped_norm < 0.1 * sim.adapter.carried_norm,
        "{sim:?}"
    );
    assert_eq!(report.estimators.len(), 2);
    let s = &report.estimators[0];
    assert_eq!(s.estimator, "simulated");
    assert!(s.scales.is_empty());
    assert_eq!(report.estimators[1].estimator, "identity");
    assert!(report.influence.is_some());
    // the saved shadow is the simulated one: loaded back it gives the reported forget NLL, and
    // that NLL is the fine-tuned model's (up to the dropped norm changes)
    let tok = ChatTokenizer::from_dir(&repo("data/models/target")).unwrap();
    let forget = Dataset::load(&tmp.path().join("forget10.jsonl"), &tok, 128).unwrap();
    let mut model = Decoder::load(&repo("data/models/target"), DType::F32, &cpu()).unwrap();
    let cfg = load_adapter(&mut model, &tmp.path().join("run/shadow")).unwrap();
    assert_eq!(cfg.r, 192);
    let reloaded = mean_nll(&model, &forget, &ForwardOptions::eval());
    assert!(
        (reloaded - s.forget_nll_after).abs() < 1e-4,
        "{reloaded} vs {s:?}"
    );
    let tuned = Decoder::load(&tmp.path().join("run/simulate/model"), DType::F32, &cpu()).unwrap();
    let direct = mean_nll(&tuned, &forget, &ForwardOptions::base_model());
    assert!(
        (direct - reloaded).abs() < 0.05 * direct,
        "{direct} vs {reloaded}"
    );
    assert!(
        reloaded > s.forget_nll_before,
        "training on retain alone forgets a little"
    );
    let md = std::fs::read_to_string(tmp.path().join("run/report.md")).unwrap();
    assert!(md.contains("simulated oracle"), "{md}");
    // without [simulate] the estimator is refused, naming the section
    let e = AttributeRecipe::load(&path, &set[..2])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[simulate]"), "{e}");
    // shadow_rank: ≥ 1, and only where the simulated estimator runs
    let with = |extra: &str, upto: usize| {
        let mut v = set[..upto].to_vec();
        v.push(extra.to_string());
        AttributeRecipe::load(&path, &v)
    };
    let e = with("attribute.shadow_rank=0", 5)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("attribute.shadow_rank must be ≥ 1"), "{e}");
    let mut influence_only = set[1..2].to_vec();
    influence_only.push("attribute.shadow_rank=8".into());
    let e = AttributeRecipe::load(&path, &influence_only)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("shadow_rank applies to the \"simulated\""),
        "{e}"
    );
    assert!(with("attribute.shadow_rank=8", 5).is_ok());
}

#[test]
fn simulated_shadow_of_an_untied_head_names_it_as_the_model_does() {
    // GPT-NeoX's untied head is `embed_out`: the adapter config must list it for PEFT
    let base = Decoder::load(&fixture("gpt_neox"), DType::F32, &cpu()).unwrap();
    assert!(!base.cfg.tie_word_embeddings);
    let mut tuned = base.clone();
    let w = &tuned.lm_head.weight;
    tuned.lm_head.weight = (w + w.ones_like().unwrap().affine(0.01, 0.0).unwrap()).unwrap();
    let (shadow, cfg, drops) = exact_shadow(&base, &tuned);
    let unlearn::lora::TargetModules::Names(names) = &cfg.target_modules else {
        panic!("{:?}", cfg.target_modules)
    };
    assert!(names.contains(&"embed_out".to_string()), "{names:?}");
    assert!(!names.contains(&"lm_head".to_string()), "{names:?}");
    assert!(drops.dropped.is_empty());
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 17]], &cpu()).unwrap();
    let input = unlearn::model::ModelInput::new(&ids, None);
    let want = tuned
        .forward(&input, &ForwardOptions::base_model())
        .unwrap();
    let got = shadow.forward(&input, &ForwardOptions::eval()).unwrap();
    assert!(
        max_abs_diff(&got, &want) < 1e-4,
        "{}",
        max_abs_diff(&got, &want)
    );
}
