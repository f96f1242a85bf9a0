//! Evaluation statistics against reference values: the fixture files in tests/fixtures/metrics
//! (produced by scipy, scikit-learn, rouge_score, NLTK and CPython's zlib; every case of every
//! file is checked) and small hand-derived examples for the rest.
use serde_json::Value;
use std::path::PathBuf;
use unlearn::metrics::*;

fn load(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/metrics")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap().clone();
    assert!(!cases.is_empty(), "{name} has no cases");
    cases
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// A sample stored either as a list ("a") or as [[value, count], ...] ("a_hist").
fn sample(case: &Value, key: &str) -> Vec<f64> {
    if let Some(v) = case.get(key) {
        return f64s(v);
    }
    let mut out = Vec::new();
    for pair in case[format!("{key}_hist")].as_array().unwrap() {
        let (value, count) = (pair[0].as_f64().unwrap(), pair[1].as_u64().unwrap());
        out.extend(std::iter::repeat_n(value, count as usize));
    }
    out
}

/// |got − want| <= max(abs, rel·|want|)
fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
    (got - want).abs() <= abs.max(rel * want.abs())
}

#[track_caller]
fn assert_close(got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol,
        "got {got:e}, want {want:e} (tol {tol:e})"
    );
}

// ---------------------------------------------------------------------------------------------
// Kolmogorov–Smirnov

fn check_ks_file(name: &str) {
    let cases = load(name);
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    for (i, c) in cases.iter().enumerate() {
        let a = sample(c, "a");
        let b = sample(c, "b");
        let r = ks_2samp_full(&a, &b).unwrap();
        let (want_d, want_p) = (
            c["statistic"].as_f64().unwrap(),
            c["pvalue"].as_f64().unwrap(),
        );
        let expect_method = if a.len().max(b.len()) <= 10000 {
            KsMethod::Exact
        } else {
            KsMethod::Asymptotic
        };
        if !close(r.statistic, want_d, 1e-12, 1e-15)
            || !close(r.pvalue, want_p, 1e-9, 1e-12)
            || r.method != expect_method
        {
            failures.push(format!(
                "{name} case {i} ({} x {}, {}): got D={:e} p={:e} {:?}, want D={want_d:e} p={want_p:e}",
                a.len(),
                b.len(),
                c.get("note").and_then(|n| n.as_str()).unwrap_or(""),
                r.statistic,
                r.pvalue,
                r.method
            ));
        }
        if want_p > 0.0 {
            worst = worst.max((r.pvalue - want_p).abs() / want_p);
        }
        // the tuple form returns the same numbers
        assert_eq!(ks_2samp(&a, &b).unwrap(), (r.statistic, r.pvalue));
    }
    eprintln!("{name}: largest relative p-value error {worst:e}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ks_2samp_matches_scipy_fixture() {
    check_ks_file("ks_2samp.json");
}

#[test]
fn ks_2samp_matches_scipy_extra_cases() {
    // exact (both code paths, ties, D = 0, D = 1 incl. 2/C(800,400) = 1.06e-239) and asymptotic
    // (max(n1, n2) > 10000) cases
    check_ks_file("ks_2samp_extra.json");
}

#[test]
fn kstwo_sf_matches_scipy_on_every_branch() {
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    for c in load("kstwo_sf.json") {
        let (n, d, want) = (
            c["n"].as_u64().unwrap(),
            c["d"].as_f64().unwrap(),
            c["sf"].as_f64().unwrap(),
        );
        let got = kstwo_sf(d, n).unwrap();
        if want > 0.0 {
            let rel = (got - want).abs() / want;
            worst = worst.max(rel);
        }
        if !close(got, want, 1e-9, 1e-12) {
            failures.push(format!("n={n} d={d:e}: got {got:e}, want {want:e}"));
        }
    }
    eprintln!("kstwo_sf: largest relative error {worst:e} (subnormal results included)");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ks_2samp_rejects_bad_input() {
    assert!(ks_2samp(&[], &[1.0]).is_err());
    assert!(ks_2samp(&[1.0], &[]).is_err());
    assert!(ks_2samp(&[1.0, f64::NAN], &[1.0]).is_err());
    assert!(kstwo_sf(0.5, 0).is_err());
}

// ---------------------------------------------------------------------------------------------
// ROC AUC, hmean, zlib

fn check_auc_file(name: &str) {
    for (i, c) in load(name).iter().enumerate() {
        let labels: Vec<bool> = c["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_i64().unwrap() == 1)
            .collect();
        let scores = f64s(&c["scores"]);
        let got = roc_auc(&labels, &scores).unwrap();
        let want = c["auc"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-12,
            "{name} case {i}: got {got}, want {want}"
        );
    }
}

#[test]
fn roc_auc_matches_sklearn() {
    check_auc_file("roc_auc.json");
    check_auc_file("roc_auc_extra.json");
}

#[test]
fn roc_auc_rejects_bad_input() {
    assert!(roc_auc(&[true, true], &[0.1, 0.2]).is_err()); // one class
    assert!(roc_auc(&[true, false], &[0.1]).is_err()); // lengths
    assert!(roc_auc(&[true, false], &[0.1, f64::NAN]).is_err());
    assert!(roc_auc(&[true, false], &[0.1, f64::INFINITY]).is_err()); // sklearn rejects inf
    assert!(roc_auc(&[], &[]).is_err());
}

#[test]
fn hmean_matches_scipy() {
    for file in ["hmean.json", "hmean_extra.json"] {
        for (i, c) in load(file).iter().enumerate() {
            let got = hmean(&f64s(&c["values"])).unwrap();
            let want = c["hmean"].as_f64().unwrap();
            assert!(
                close(got, want, 1e-14, 0.0),
                "{file} case {i}: got {got}, want {want}"
            );
        }
    }
}

#[test]
fn hmean_zero_negative_and_empty() {
    // a zero gives 1/0 = inf in the mean of reciprocals → 0 (scipy)
    assert_eq!(hmean(&[0.5, 0.0, 0.7]).unwrap(), 0.0);
    // +inf contributes 1/inf = 0: 1 / ((0 + 1)/2) = 2 (scipy.stats.hmean([inf, 1]) = 2.0)
    assert_eq!(hmean(&[f64::INFINITY, 1.0]).unwrap(), 2.0);
    assert!(hmean(&[0.5, -0.1]).is_err());
    assert!(hmean(&[]).is_err());
    assert!(hmean(&[f64::NAN]).is_err());
}

#[test]
fn zlib_len_matches_python() {
    for file in ["zlib.json", "zlib_extra.json"] {
        for c in load(file) {
            let text = c["text"].as_str().unwrap();
            let want = c["zlib_len"].as_u64().unwrap() as usize;
            assert_eq!(zlib_len(text).unwrap(), want, "{file}: {text:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ROUGE and the Porter stemmer

#[test]
fn porter_stemmer_matches_nltk() {
    let mut failures = Vec::new();
    for c in load("porter.json") {
        let (word, want) = (c[0].as_str().unwrap(), c[1].as_str().unwrap());
        let got = porter_stem(word);
        if got != want {
            failures.push(format!("{word}: got {got}, want {want}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn check_rouge_file(name: &str) {
    let mut failures = Vec::new();
    for (i, c) in load(name).iter().enumerate() {
        let (target, prediction) = (
            c["target"].as_str().unwrap(),
            c["prediction"].as_str().unwrap(),
        );
        let s = rouge(target, prediction);
        for (key, got) in [("rouge1", s.rouge1), ("rougeL", s.rouge_l)] {
            let want = &c[key];
            for (field, g) in [
                ("precision", got.precision),
                ("recall", got.recall),
                ("fmeasure", got.fmeasure),
            ] {
                let w = want[field].as_f64().unwrap();
                if (g - w).abs() > 1e-15 {
                    failures.push(format!(
                        "{name} case {i} {key}.{field}: got {g}, want {w} (target {target:?}, prediction {prediction:?}, tokens {:?} / {:?})",
                        rouge_tokenize(target),
                        rouge_tokenize(prediction)
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rouge_matches_rouge_score() {
    check_rouge_file("rouge.json");
    check_rouge_file("rouge_extra.json");
}

// ---------------------------------------------------------------------------------------------
// TOFU

#[test]
fn probabilities_average_losses_before_exponentiating() {
    // losses ln 2 and ln 8: mean = 2 ln 2 → exp(−2 ln 2) = 1/4 (the geometric mean of 1/2 and
    // 1/8), not the mean of the probabilities (5/16)
    let p = prob_from_losses(&[2f64.ln(), 8f64.ln()]).unwrap();
    assert_close(p, 0.25, 1e-15);
    assert_close(prob_from_avg_loss(2f64.ln()), 0.5, 1e-15);
    assert!(prob_from_losses(&[]).is_err());
}

#[test]
fn truth_ratio_and_aggregations() {
    // P_c = exp(−ln 2) = 1/2; P_w = exp(−mean(ln 2, ln 8)) = 1/4 → R = 0.25/(0.5 + 1e-10)
    let r = truth_ratio(&[2f64.ln()], &[2f64.ln(), 8f64.ln()]).unwrap();
    assert_close(r, 0.25 / (0.5 + 1e-10), 1e-15);
    // closer_to_1_better: mean(min(R, 1/(R+1e-10))): R = 0.5 → 0.5; R = 2 → ~0.5; R = 1 → ~1
    let c = truth_ratio_closer_to_1(&[0.5, 2.0, 1.0]).unwrap();
    let want = (0.5 + 1.0 / (2.0 + 1e-10) + 1.0 / (1.0 + 1e-10)) / 3.0;
    assert_close(c, want, 1e-15);
    assert_close(c, 2.0 / 3.0, 1e-9);
    // true_better: mean(max(0, 1 − R)) = mean(0.5, 0, 0.75) = 5/12
    assert_close(
        truth_ratio_true_better(&[0.5, 2.0, 0.25]).unwrap(),
        5.0 / 12.0,
        1e-15,
    );
    // prob_mean: mean(0.5/(0.5+0.5), 0.2/(0.2+0.6)) = mean(0.5, 0.25) = 0.375
    assert_close(
        prob_mean_score(&[0.5, 0.2], &[0.5, 0.6]).unwrap(),
        0.375,
        1e-15,
    );
    assert!(truth_ratio_true_better(&[]).is_err());
    assert!(prob_mean_score(&[0.5], &[0.5, 0.1]).is_err());
}

#[test]
fn normalised_probability_uses_single_answer_probs() {
    // P_c = 1/2, wrong = 1/4, 1/4, 1/8 (each its own exp(−loss), not averaged):
    // 0.5 / (0.5 + 0.625 + 1e-10) = 0.4444…
    let p = normalised_prob(2f64.ln(), &[4f64.ln(), 4f64.ln(), 8f64.ln()]).unwrap();
    assert_close(p, 0.5 / (1.125 + 1e-10), 1e-15);
}

#[test]
fn forget_quality_is_the_ks_pvalue() {
    // identical truth-ratio sets: D = 0 → p = 1
    let r = [0.3, 0.5, 0.9, 1.2];
    assert_eq!(forget_quality(&r, &r).unwrap(), 1.0);
    // full separation of 3 vs 3 items: p = 2 / C(6, 3) = 0.1; KS is invariant to inverting R
    let u = [0.1, 0.2, 0.3];
    let ret = [0.7, 0.8, 0.9];
    assert_close(forget_quality(&u, &ret).unwrap(), 0.1, 1e-15);
    let inv = |v: &[f64]| v.iter().map(|x| 1.0 / x).collect::<Vec<_>>();
    assert_close(forget_quality(&inv(&u), &inv(&ret)).unwrap(), 0.1, 1e-15);
}

#[test]
fn model_utility_is_the_harmonic_mean_of_nine() {
    let mut c = UtilityComponents {
        retain_q_a_prob: 1.0,
        retain_q_a_rouge: 1.0,
        retain_truth_ratio: 1.0,
        ra_q_a_prob_normalised: 1.0,
        ra_q_a_rouge: 1.0,
        ra_truth_ratio: 1.0,
        wf_q_a_prob_normalised: 1.0,
        wf_q_a_rouge: 1.0,
        wf_truth_ratio: 0.1,
    };
    // 9 / (8·1 + 1/0.1) = 9/18 = 0.5
    assert_close(model_utility(&c).unwrap(), 0.5, 1e-15);
    c.ra_q_a_rouge = 0.0; // any zero → 0
    assert_eq!(model_utility(&c).unwrap(), 0.0);
    c.ra_q_a_rouge = -0.2;
    assert!(model_utility(&c).is_err());
}

// ---------------------------------------------------------------------------------------------
// Memorisation

#[test]
fn exact_memorization_by_hand() {
    // 3 of 4 positions correct
    assert_eq!(
        exact_memorization(&[1, 2, 3, 4], &[1, 2, 9, 4]).unwrap(),
        Some(0.75)
    );
    assert_eq!(exact_memorization(&[], &[]).unwrap(), None);
    assert!(exact_memorization(&[1], &[1, 2]).is_err());
    // items without answer tokens are skipped when averaging
    assert_eq!(
        mean_defined(&[Some(0.5), None, Some(1.0)]).unwrap(),
        Some(0.75)
    );
    assert_eq!(mean_defined(&[None]).unwrap(), None);
}

#[test]
fn extraction_strength_by_hand() {
    let y = [1, 2, 3, 4];
    // all correct: k* = 0 → 1
    assert_eq!(extraction_strength(&y, &y).unwrap(), 1.0);
    // first token wrong: pred[1..] = y[1..] → k* = 1 → 1 − 1/4
    assert_eq!(extraction_strength(&[9, 2, 3, 4], &y).unwrap(), 0.75);
    // third token wrong: k* = 3 → 1 − 3/4
    assert_eq!(extraction_strength(&[1, 2, 0, 4], &y).unwrap(), 0.25);
    // last token wrong: no suffix matches, the loop stops at k = N − 1 → 1/N (quirk), not 0
    assert_eq!(extraction_strength(&[1, 2, 3, 9], &y).unwrap(), 0.25);
    assert_eq!(extraction_strength(&[0, 0, 0, 0], &y).unwrap(), 0.25);
    // N = 0 → 0
    assert_eq!(extraction_strength(&[], &[]).unwrap(), 0.0);
}

// ---------------------------------------------------------------------------------------------
// MIA and privleak

#[test]
fn mia_scores_by_hand() {
    // LOSS = −mean log p = (1 + 2 + 3)/3
    assert_close(mia_loss(&[-1.0, -2.0, -3.0]).unwrap(), 2.0, 1e-15);
    // ZLib: loss / zlib length; "Identical sentence here." compresses to 30 bytes (zlib.json)
    assert_close(
        mia_zlib(2.0, "Identical sentence here.").unwrap(),
        2.0 / 30.0,
        1e-15,
    );
    // Min-40%: N = 5 → n = ⌊2.0⌋ = 2 smallest: −5, −3 → score 4
    let lp = [-0.1, -5.0, -0.2, -3.0, -0.3];
    assert_close(mia_min_k(&lp, MIN_K_DEFAULT).unwrap(), 4.0, 1e-15);
    // N = 2 → ⌊0.8⌋ = 0 → at least one: the smallest, −5 → 5
    assert_close(mia_min_k(&[-0.1, -5.0], 0.4).unwrap(), 5.0, 1e-15);
    assert_eq!(mia_min_k(&[], 0.4).unwrap(), 0.0);
    assert!(mia_min_k(&lp, 0.0).is_err());
    // Reference: 2.5 − 1.0
    assert_close(mia_reference(2.5, 1.0).unwrap(), 1.5, 1e-15);
    // GradNorm: mean of per-tensor norms
    assert_close(mia_gradnorm(&[1.0, 2.0, 3.0]).unwrap(), 2.0, 1e-15);
}

#[test]
fn min_k_plus_plus_by_hand() {
    // p = (1/2, 1/4, 1/4): log p = (−l, −2l, −2l) with l = ln 2.
    // μ = ½(−l) + ½(−2l) = −1.5 l; E[(log p)²] = ½ l² + ½·4 l² = 2.5 l²; σ² = 0.25 l²
    let l = 2f64.ln();
    let row = [0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()];
    let (mu, var) = vocab_logprob_moments(&row).unwrap();
    assert_close(mu, -1.5 * l, 1e-7);
    assert_close(var, 0.25 * l * l, 1e-7);
    // tokens log p = −l (z = (−l + 1.5l)/(0.5l) = 1) and −2l (z = −1); k = 0.5 → n = 1 → the
    // smallest z, −1 → score 1
    let (m, v) = (-1.5 * l, 0.25 * l * l);
    let s = mia_min_k_plus_plus(&[-l, -2.0 * l], &[m, m], &[v, v], 0.5).unwrap();
    assert_close(s, 1.0, 1e-12);
    // σ² = 0 is clamped to 1e-6 (σ = 1e-3): z = 0.001/0.001 = 1 → score −1
    let s = mia_min_k_plus_plus(&[-0.999], &[-1.0], &[0.0], 0.4).unwrap();
    assert_close(s, -1.0, 1e-9);
    assert!(mia_min_k_plus_plus(&[-1.0], &[-1.0, -1.0], &[1.0], 0.4).is_err());
}

#[test]
fn mia_auc_orientation() {
    // forget (members, label 0) have lower losses than holdout (label 1): memorised → AUC 1
    assert_eq!(mia_auc(&[0.1, 0.2], &[0.3, 0.4]).unwrap(), 1.0);
    assert_eq!(mia_auc(&[0.3, 0.4], &[0.1, 0.2]).unwrap(), 0.0);
    // ties count ½
    assert_eq!(mia_auc(&[0.5], &[0.5]).unwrap(), 0.5);
    // pairs (holdout > forget): 2>1, 4>1, 4>3 yes; 2>3 no → 3/4
    assert_eq!(mia_auc(&[1.0, 3.0], &[2.0, 4.0]).unwrap(), 0.75);
}

#[test]
fn privleak_by_hand() {
    // s = 1 − 0.99 = 0.01, r = 1 − 0.5 = 0.5 → (0.01 − 0.5)/(0.5 + 1e-10)·100 ≈ −98 (leaks)
    let p = privleak(0.99, Some(0.5)).unwrap();
    assert_close(p, (0.01 - 0.5) / (0.5 + 1e-10) * 100.0, 1e-12);
    assert_close(p, -98.0, 1e-6);
    // no reference log: AUC 0.5 → r = 0.5; an unlearned AUC of 0.5 is then ideal (0)
    assert_close(privleak(0.5, None).unwrap(), 0.0, 1e-15);
    // over-unlearned: s = 0.7, r = 0.6 → +16.67
    assert_close(privleak(0.3, Some(0.4)).unwrap(), 0.1 / 0.6 * 100.0, 1e-6);
    assert_close(rel_diff(1.1, 1.0).unwrap(), 10.0, 1e-12);
    assert!(rel_diff(1.0, 0.0).is_err());
}

// ---------------------------------------------------------------------------------------------
// Multiple choice

#[test]
fn multiple_choice_by_hand() {
    // tie between choices 1 and 2 → the first
    assert_eq!(mc_predict(&[-1.0, -0.5, -0.5, -2.0]).unwrap(), 1);
    assert!(mc_predict(&[]).is_err());
    assert!(mc_predict(&[0.0, f64::NAN]).is_err());
    // right, wrong, tie → first (right), right → 3/4
    let items = vec![
        (vec![-1.0, -2.0], 0),
        (vec![-3.0, -1.0], 0),
        (vec![0.0, 0.0], 0),
        (vec![-1.0, -1.0, -0.5], 2),
    ];
    assert_eq!(mc_accuracy(&items).unwrap(), 0.75);
    assert!(mc_accuracy(&[(vec![0.0], 1)]).is_err());
    // a: 1/2, b: 2/3 → pooled 3/5, macro (1/2 + 2/3)/2
    let b = accuracy_by_subject(
        &["a", "a", "b", "b", "b"],
        &[true, false, true, true, false],
    )
    .unwrap();
    assert_eq!(
        b.overall,
        GroupAccuracy {
            correct: 3,
            total: 5
        }
    );
    assert_eq!(b.overall.accuracy(), 0.6);
    assert_eq!(
        b.per_subject["a"],
        GroupAccuracy {
            correct: 1,
            total: 2
        }
    );
    assert_eq!(
        b.per_subject["b"],
        GroupAccuracy {
            correct: 2,
            total: 3
        }
    );
    assert_close(b.macro_accuracy, (0.5 + 2.0 / 3.0) / 2.0, 1e-15);
}

// ---------------------------------------------------------------------------------------------
// KLoM

#[test]
fn logit_margin_by_hand() {
    // z = (2, 1, 0), y = 0: 2 − ln(e¹ + e⁰)
    let m = logit_margin(&[2.0, 1.0, 0.0], 0).unwrap();
    assert_close(m, 2.0 - (1f64.exp() + 1.0).ln(), 1e-12);
    assert!(logit_margin(&[1.0, 2.0], 2).is_err());
}

#[test]
fn klom_histograms_by_hand() {
    let two = KlomParams {
        bins: 2,
        ..KlomParams::default()
    };
    // identical samples → 0
    assert_eq!(klom(&[0.1, 0.5, 0.9], &[0.1, 0.5, 0.9]).unwrap(), 0.0);
    // p = (0,0,1,1), q = (0,1,1,1), edges (0, .5, 1); the maxima 1 fall in the last bin
    // (inclusive): P = (.5, .5), Q = (.25, .75) → .5 ln 2 + .5 ln(2/3) = .5 ln(4/3)
    let kl = binned_kl(&[0.0, 0.0, 1.0, 1.0], &[0.0, 1.0, 1.0, 1.0], &two).unwrap();
    assert_close(kl, 0.5 * (4.0f64 / 3.0).ln(), 1e-15);
    // empty oracle bin → ε floor: P = (1, 0), Q = (0, 1) → ln(1/1e-5)
    let kl = binned_kl(&[0.0, 0.0], &[1.0, 1.0], &two).unwrap();
    assert_close(kl, (1e5f64).ln(), 1e-12);
    // clipping to ±100 before binning: p = (−300, −50, 100) → (−100, −50, 100), edges
    // (−100, 0, 100): P = (2/3, 1/3); q = (0, 100, 100): Q = (0, 1)
    // → 2/3 ln((2/3)/1e-5) + 1/3 ln(1/3)   (without clipping P would be (1/3, 2/3))
    let kl = binned_kl(&[-300.0, -50.0, 100.0], &[0.0, 100.0, 100.0], &two).unwrap();
    let want = 2.0 / 3.0 * ((2.0 / 3.0) / 1e-5f64).ln() + 1.0 / 3.0 * (1.0f64 / 3.0).ln();
    assert_close(kl, want, 1e-12);
}

#[test]
fn klom_direction_is_unlearned_given_oracle() {
    assert_eq!(KLOM_DIRECTION, "unlearned||oracle");
    // unlearned (0,0,0,1): P = (.75, .25) in the first and last of 20 bins; oracle (0,1):
    // Q = (.5, .5). KL(P‖Q) = .75 ln 1.5 + .25 ln .5 ≈ 0.1308; KL(Q‖P) ≈ 0.1438
    let u = [0.0, 0.0, 0.0, 1.0];
    let o = [0.0, 1.0];
    let want = 0.75 * 1.5f64.ln() + 0.25 * 0.5f64.ln();
    assert_close(klom(&u, &o).unwrap(), want, 1e-15);
    let reverse = 0.5 * (0.5f64 / 0.75).ln() + 0.5 * 2f64.ln();
    assert_close(klom(&o, &u).unwrap(), reverse, 1e-15);
}

#[test]
fn klom_sequence_and_percentile() {
    // 2 models × 2 positions. Position 0: both ensembles all 0 → 0. Position 1: unlearned
    // (0, 1) → P = (.5 in bin 0, .5 in bin 19), oracle (0, 0) → Q = (1, 0):
    // .5 ln .5 + .5 ln(.5/1e-5) = .5 ln(2.5e4). Sequence value: mean over positions.
    let unlearned = vec![vec![0.0, 0.0], vec![0.0, 1.0]];
    let oracle = vec![vec![0.0, 0.0], vec![0.0, 0.0]];
    let v = klom_sequence(&unlearned, &oracle).unwrap();
    assert_close(v, 0.25 * 2.5e4f64.ln(), 1e-12);
    assert!(klom_sequence(&unlearned, &[vec![0.0]]).is_err());
    // 95th percentile (numpy linear): sorted (1, 2, 3, 4), index 2.85 → 3.85
    assert_close(
        percentile(&[4.0, 1.0, 3.0, 2.0], 95.0).unwrap(),
        3.85,
        1e-15,
    );
}
