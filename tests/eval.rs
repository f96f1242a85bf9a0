//! `unlearn eval`: the tofu, perplexity and mcq suites on the tiny Llama fixture, with values
//! recomputed independently (host-side log-softmax of raw logits, scipy-exact KS), retain
//! references from a model or a log, every bad input, and the command line.
mod common;
use candle_core::DType;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use unlearn::eval::{evaluate, write_outputs, DataArg, EvalRequest, Reference, Suite};
use unlearn::lora::load_adapter;
use unlearn::metrics::ks_2samp;
use unlearn::model::{Decoder, ForwardOptions, ModelInput};
use unlearn::tokenizer::{ChatTokenizer, IGNORE_INDEX};

const SPLITS: [(&str, &str); 5] = [
    ("forget", "F"),
    ("retain", "R"),
    ("holdout", "H"),
    ("ra", "A"),
    ("wf", "W"),
];

/// 6 TOFU-schema rows per split, short enough for the fixture's 64 positions.
fn tofu_rows(prefix: &str) -> Vec<Value> {
    let jobs = ["poet", "baker", "pilot", "judge", "actor", "nurse"];
    (0..6)
        .map(|i| {
            let name = format!("{prefix}{i}");
            let job = jobs[i];
            json!({
                "question": format!("Who is {name}?"),
                "answer": format!("{name} is a {job}."),
                "paraphrased_answer": format!("A {job}, {name}."),
                "perturbed_answer": [
                    format!("{name} is a cook."),
                    format!("{name} was born in 1900."),
                    format!("{name} is the author of it."),
                ],
                "paraphrased_question": format!("Who's {name}?"),
            })
        })
        .collect()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// A temp dir with forget/retain/holdout/ra/wf .jsonl files (forget as a JSON array).
fn tofu_data() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (split, prefix) in SPLITS {
        let rows = tofu_rows(prefix);
        if split == "forget" {
            std::fs::write(
                dir.path().join("forget.json"),
                serde_json::to_string(&rows).unwrap(),
            )
            .unwrap();
        } else {
            write_jsonl(&dir.path().join(format!("{split}.jsonl")), &rows);
        }
    }
    dir
}

fn split_path(dir: &Path, split: &str) -> PathBuf {
    if split == "forget" {
        dir.join("forget.json")
    } else {
        dir.join(format!("{split}.jsonl"))
    }
}

fn request(suite: &str, data: &[(&str, PathBuf)]) -> EvalRequest {
    EvalRequest {
        suite: Suite::resolve(suite).unwrap(),
        data: data
            .iter()
            .map(|(s, p)| DataArg {
                split: s.to_string(),
                spec: Some(p.display().to_string()),
            })
            .collect(),
        model: fixture("llama"),
        model_label: "llama".into(),
        adapter: None,
        reference: None,
        batch_size: Some(4),
        max_new_tokens: Some(8),
        limit: None,
        device: cpu(),
        progress: false,
        prompt_style: Default::default(),
    }
}

fn tofu_request(dir: &Path, splits: &[&str]) -> EvalRequest {
    let data: Vec<(&str, PathBuf)> = splits.iter().map(|s| (*s, split_path(dir, s))).collect();
    request("tofu", &data)
}

/// Run, write the three files, read them back.
fn run_and_read(req: &EvalRequest, out: &Path) -> (Value, serde_json::Map<String, Value>, String) {
    let o = evaluate(req).unwrap();
    write_outputs(out, &o).unwrap();
    let log: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("EVAL.json")).unwrap()).unwrap();
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("SUMMARY.json")).unwrap()).unwrap();
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    // nothing left behind under a temporary name
    for e in std::fs::read_dir(out).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.contains(".tmp"), "leftover {name}");
    }
    (log, summary.as_object().unwrap().clone(), report)
}

fn f(summary: &serde_json::Map<String, Value>, key: &str) -> f64 {
    summary
        .get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("summary has no number '{key}': {summary:?}"))
}

fn item_scores(log: &Value, split: &str, key: &str) -> Vec<f64> {
    log["splits"][split]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| it["scores"][key].as_f64().unwrap())
        .collect()
}

/// Mean NLL of the labelled tokens of each example from raw logits, log-softmax on the host in
/// f64 (independent of score.rs and the fused ops).
fn host_mean_nll(model: &Decoder, examples: &[(Vec<u32>, Vec<i64>)]) -> Vec<f64> {
    examples
        .iter()
        .map(|(ids, labels)| {
            let t = ids.len();
            let input = candle_core::Tensor::from_vec(ids.clone(), (1, t), &cpu()).unwrap();
            let logits = model
                .forward(&ModelInput::new(&input, None), &ForwardOptions::eval())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec3::<f64>()
                .unwrap();
            let (mut sum, mut n) = (0.0, 0);
            for j in 0..t - 1 {
                let l = labels[j + 1];
                if l == IGNORE_INDEX {
                    continue;
                }
                let row = &logits[0][j];
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                sum += lse - row[l as usize];
                n += 1;
            }
            sum / n as f64
        })
        .collect()
}

/// Host-side log p(label) and argmax at the labelled positions, EOS (the last) excluded.
fn host_token_stats(
    model: &Decoder,
    ids: &[u32],
    labels: &[i64],
) -> (Vec<f64>, Vec<u32>, Vec<u32>) {
    let t = ids.len();
    let input = candle_core::Tensor::from_vec(ids.to_vec(), (1, t), &cpu()).unwrap();
    let logits = model
        .forward(&ModelInput::new(&input, None), &ForwardOptions::eval())
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec3::<f64>()
        .unwrap();
    let (mut lp, mut am, mut lab) = (vec![], vec![], vec![]);
    for j in 0..t - 1 {
        let l = labels[j + 1];
        if l == IGNORE_INDEX {
            continue;
        }
        let row = &logits[0][j];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        lp.push(row[l as usize] - lse);
        let arg = (0..row.len()).fold(0, |b, k| if row[k] > row[b] { k } else { b });
        am.push(arg as u32);
        lab.push(l as u32);
    }
    lp.pop();
    am.pop();
    lab.pop();
    (lp, am, lab)
}

#[test]
fn tofu_suite_with_an_adapter_matches_host_side_recomputation() {
    let data = tofu_data();
    let out = tempfile::tempdir().unwrap();
    let mut req = tofu_request(data.path(), &["forget", "retain", "holdout", "ra", "wf"]);
    req.adapter = Some(fixture("llama-lora"));
    let (log, summary, report) = run_and_read(&req, out.path());

    for key in [
        "forget_Q_A_Prob",
        "forget_Q_A_PARA_Prob",
        "forget_Q_A_PERT_Prob",
        "forget_Q_A_ROUGE",
        "forget_truth_ratio",
        "extraction_strength",
        "exact_memorization",
        "retain_Q_A_Prob",
        "retain_Q_A_ROUGE",
        "retain_Truth_Ratio",
        "ra_Q_A_Prob_normalised",
        "ra_Q_A_ROUGE",
        "ra_Truth_Ratio",
        "wf_Q_A_Prob_normalised",
        "wf_Q_A_ROUGE",
        "wf_Truth_Ratio",
        "model_utility",
        "mia_loss",
        "mia_zlib",
        "mia_min_k",
        "mia_min_k_plus_plus",
        "privleak",
    ] {
        let v = f(&summary, key);
        assert!(v.is_finite(), "{key} = {v}");
    }
    // no reference: forget_quality is null and privleak uses AUC 0.5
    assert_eq!(summary["forget_quality"], Value::Null);
    let auc = f(&summary, "mia_min_k");
    let expected_privleak = ((1.0 - auc) - 0.5) / (0.5 + 1e-10) * 100.0;
    assert!((f(&summary, "privleak") - expected_privleak).abs() < 1e-9);
    assert_eq!(
        summary["model_utility_components"]
            .as_array()
            .unwrap()
            .len(),
        9
    );
    assert_eq!(log["suite"], "tofu");
    assert_eq!(log["suite_kind"], "tofu");
    assert_eq!(
        log["splits"]["forget"]["items"].as_array().unwrap().len(),
        6
    );
    let first = &log["splits"]["forget"]["items"][0];
    assert_eq!(first["question"], "Who is F0?");
    assert!(first["generation"].is_string());
    assert!(first["generation_tokens"].as_u64().unwrap() <= 8);
    assert!(report.contains("| **forget_Q_A_Prob** |") && report.contains("## Generations"));

    // forget_Q_A_Prob from raw logits of the adapted model
    let mut model = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    load_adapter(&mut model, &fixture("llama-lora")).unwrap();
    let tok = ChatTokenizer::from_dir(&fixture("llama")).unwrap();
    let rows = tofu_rows("F");
    let enc = |field: &str| -> Vec<(Vec<u32>, Vec<i64>)> {
        rows.iter()
            .map(|r| {
                let e = tok
                    .encode_qa(
                        r["question"].as_str().unwrap(),
                        r[field].as_str().unwrap(),
                        None,
                    )
                    .unwrap();
                (e.input_ids, e.labels)
            })
            .collect()
    };
    let nll = host_mean_nll(&model, &enc("answer"));
    let prob = nll.iter().map(|l| (-l).exp()).sum::<f64>() / nll.len() as f64;
    let got = f(&summary, "forget_Q_A_Prob");
    assert!((prob - got).abs() < 1e-5 * prob, "{prob} vs {got}");
    // per-item truth ratio: P(perturbed) / P(paraphrased) with losses averaged first
    let para = host_mean_nll(&model, &enc("paraphrased_answer"));
    let ratios = item_scores(&log, "forget", "truth_ratio");
    for (i, r) in rows.iter().enumerate() {
        let pert: Vec<(Vec<u32>, Vec<i64>)> = r["perturbed_answer"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let e = tok
                    .encode_qa(r["question"].as_str().unwrap(), p.as_str().unwrap(), None)
                    .unwrap();
                (e.input_ids, e.labels)
            })
            .collect();
        let losses = host_mean_nll(&model, &pert);
        let pw = (-(losses.iter().sum::<f64>() / losses.len() as f64)).exp();
        let expected = pw / ((-para[i]).exp() + 1e-10);
        assert!(
            (ratios[i] - expected).abs() < 1e-4 * expected,
            "item {i}: {} vs {expected}",
            ratios[i]
        );
    }
    // extraction strength and Min-K% from host-side token statistics
    let answers = enc("answer");
    let mut es = vec![];
    let min_k = item_scores(&log, "forget", "mia_min_k");
    for (i, (ids, labels)) in answers.iter().enumerate() {
        let (lp, am, lab) = host_token_stats(&model, ids, labels);
        es.push(unlearn::metrics::extraction_strength(&am, &lab).unwrap());
        let mk = unlearn::metrics::mia_min_k(&lp, 0.4).unwrap();
        assert!(
            (mk - min_k[i]).abs() < 1e-4,
            "item {i}: {mk} vs {}",
            min_k[i]
        );
    }
    let es_mean = es.iter().sum::<f64>() / es.len() as f64;
    assert!((f(&summary, "extraction_strength") - es_mean).abs() < 1e-12);
    // the forget truth ratio aggregate is mean(min(R, 1/R))
    let agg = ratios.iter().map(|r| r.min(1.0 / (r + 1e-10))).sum::<f64>() / 6.0;
    assert!((f(&summary, "forget_truth_ratio") - agg).abs() < 1e-12);
    // ROUGE-L recall from the stored generation
    let rouges = item_scores(&log, "forget", "rougeL_recall");
    for (i, it) in log["splits"]["forget"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let r = unlearn::metrics::rouge(
            it["answer"].as_str().unwrap(),
            it["generation"].as_str().unwrap(),
        );
        assert!((r.rouge_l.recall - rouges[i]).abs() < 1e-12);
    }

    // without the adapter the model is another one
    let out2 = tempfile::tempdir().unwrap();
    let req = tofu_request(data.path(), &["forget"]);
    let (_, base, _) = run_and_read(&req, out2.path());
    assert!((f(&base, "forget_Q_A_Prob") - got).abs() > 1e-9);
    // and with the forget split alone: no model utility, no privleak
    assert!(!base.contains_key("model_utility") && !base.contains_key("privleak"));
}

#[test]
fn retain_model_and_retain_log_give_the_same_forget_quality() {
    let data = tofu_data();
    let tmp = tempfile::tempdir().unwrap();
    // the retain model's own tofu evaluation
    let retain_dir = tmp.path().join("retain");
    let mut req = tofu_request(data.path(), &["forget", "holdout"]);
    req.model = fixture("llama-lora-merged");
    let (retain_log, retain_summary, _) = run_and_read(&req, &retain_dir);
    assert_eq!(retain_summary["forget_quality"], Value::Null);

    let mut req = tofu_request(data.path(), &["forget", "holdout", "retain"]);
    req.adapter = Some(fixture("llama-lora"));
    req.reference = Some(Reference::Model {
        dir: fixture("llama-lora-merged"),
        label: "merged".into(),
    });
    let (log_m, by_model, _) = run_and_read(&req, &tmp.path().join("by_model"));
    req.reference = Some(Reference::Log(retain_dir.join("EVAL.json")));
    let (log_l, by_log, report) = run_and_read(&req, &tmp.path().join("by_log"));

    // forget quality = KS p-value of the stored per-item truth ratios
    let mine = item_scores(&log_l, "forget", "truth_ratio");
    let theirs = item_scores(&retain_log, "forget", "truth_ratio");
    let (_, p) = ks_2samp(&mine, &theirs).unwrap();
    assert_eq!(f(&by_log, "forget_quality"), p);
    let fq_model = f(&by_model, "forget_quality");
    assert!((fq_model - p).abs() < 1e-12, "{fq_model} vs {p}");
    let ref_ratios: Vec<f64> = log_m["reference"]["values"]["forget_truth_ratio"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(ref_ratios.len(), 6);
    for (a, b) in ref_ratios.iter().zip(&theirs) {
        assert!((a - b).abs() < 1e-12 * b.abs().max(1.0));
    }
    // privleak against the retain model's Min-K AUC
    let r_auc = f(&retain_summary, "mia_min_k");
    let s = 1.0 - f(&by_log, "mia_min_k");
    let expected = (s - (1.0 - r_auc)) / ((1.0 - r_auc) + 1e-10) * 100.0;
    assert!((f(&by_log, "privleak") - expected).abs() < 1e-9);
    assert!((f(&by_model, "privleak") - expected).abs() < 1e-6);
    // only retain among the utility splits: model utility over its three numbers, said so
    assert_eq!(
        by_log["model_utility_components"],
        json!(["retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio"])
    );
    let mu = unlearn::metrics::hmean(&[
        f(&by_log, "retain_Q_A_Prob"),
        f(&by_log, "retain_Q_A_ROUGE"),
        f(&by_log, "retain_Truth_Ratio"),
    ])
    .unwrap();
    assert_eq!(f(&by_log, "model_utility"), mu);
    let notes = log_l["notes"].as_array().unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap().contains("3 of its 9 components")),
        "{notes:?}"
    );
    assert!(report.contains("3 of its 9 components"));

    // an open-unlearning TOFU_EVAL.json works as a retain log too
    let ou = tmp.path().join("TOFU_EVAL.json");
    let by_index: serde_json::Map<String, Value> = theirs
        .iter()
        .enumerate()
        .map(|(i, r)| (i.to_string(), json!({ "score": r })))
        .collect();
    std::fs::write(
        &ou,
        json!({
            "forget_truth_ratio": {"agg_value": 0.5, "value_by_index": by_index},
            "mia_min_k": {"agg_value": r_auc},
        })
        .to_string(),
    )
    .unwrap();
    req.reference = Some(Reference::Log(ou));
    let o = evaluate(&req).unwrap();
    assert_eq!(o.summary["forget_quality"].as_f64(), Some(p));
    assert!((o.summary["privleak"].as_f64().unwrap() - expected).abs() < 1e-9);
}

#[test]
fn the_model_as_its_own_retain_model_has_forget_quality_one() {
    let data = tofu_data();
    let mut req = tofu_request(data.path(), &["forget", "holdout"]);
    req.reference = Some(Reference::Model {
        dir: fixture("llama"),
        label: "llama".into(),
    });
    let o = evaluate(&req).unwrap();
    assert_eq!(o.summary["forget_quality"].as_f64(), Some(1.0));
    assert_eq!(o.summary["privleak"].as_f64(), Some(0.0));
}

#[test]
fn perplexity_suite_matches_host_side_nll() {
    let data = tofu_data();
    let dir = data.path();
    let texts = dir.join("texts.jsonl");
    write_jsonl(
        &texts,
        &[
            json!({"text": "The author was born in Paris."}),
            json!({"text": "She wrote books."}),
            json!({"text": "A tale of the sea."}),
        ],
    );
    let out = tempfile::tempdir().unwrap();
    let req = request(
        "perplexity",
        &[
            ("wiki", texts.clone()),
            ("forget", split_path(dir, "forget")),
        ],
    );
    let (log, summary, report) = run_and_read(&req, out.path());
    let model = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    let tok = ChatTokenizer::from_dir(&fixture("llama")).unwrap();
    let examples: Vec<(Vec<u32>, Vec<i64>)> = [
        "The author was born in Paris.",
        "She wrote books.",
        "A tale of the sea.",
    ]
    .iter()
    .map(|t| {
        let e = tok.encode_text(t, None).unwrap();
        (e.input_ids, e.labels)
    })
    .collect();
    let nll = host_mean_nll(&model, &examples);
    let counts: Vec<f64> = examples.iter().map(|e| (e.0.len() - 1) as f64).collect();
    let total =
        nll.iter().zip(&counts).map(|(l, c)| l * c).sum::<f64>() / counts.iter().sum::<f64>();
    assert!((f(&summary, "wiki_nll") - total).abs() < 1e-5);
    assert!((f(&summary, "wiki_perplexity") - total.exp()).abs() < 1e-3 * total.exp());
    assert_eq!(f(&summary, "wiki_tokens"), counts.iter().sum::<f64>());
    for key in ["forget_nll", "forget_perplexity", "nll", "perplexity"] {
        assert!(f(&summary, key).is_finite());
    }
    assert_eq!(log["suite_kind"], "perplexity");
    assert_eq!(
        log["splits"]["wiki"]["items"][1]["text"],
        "She wrote books."
    );
    assert!(report.contains("wiki_perplexity"));
}

#[test]
fn mcq_suite_from_a_toml_file_matches_host_side_letter_likelihoods() {
    let dir = tempfile::tempdir().unwrap();
    // no description, so contexts fit the fixture's 64 positions
    let suite_path = dir.path().join("mini.toml");
    std::fs::write(
        &suite_path,
        "name = \"mini-mcq\"\nkind = \"mcq\"\nany_split = true\n[scoring]\nbatch_size = 3\n[prompt]\ndescription = \"\"\n",
    )
    .unwrap();
    let rows: Vec<Value> = (0..6)
        .map(|i| {
            json!({
                "question": format!("Is {i} odd?"),
                "choices": ["yes", "no", "maybe"],
                "answer": i % 3,
                "subject": if i < 3 { "math" } else { "logic" },
            })
        })
        .collect();
    let qs = dir.path().join("q.jsonl");
    write_jsonl(&qs, &rows);
    let out = dir.path().join("out");
    let req = request(suite_path.to_str().unwrap(), &[("quiz", qs.clone())]);
    let (log, summary, _) = run_and_read(&req, &out);
    assert_eq!(log["suite"], "mini-mcq");
    let model = Decoder::load(&fixture("llama"), DType::F32, &cpu()).unwrap();
    let tok = ChatTokenizer::from_dir(&fixture("llama")).unwrap();
    let items = log["splits"]["quiz"]["items"].as_array().unwrap();
    let mut correct = 0;
    let mut by_subject: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (i, it) in items.iter().enumerate() {
        let ctx = format!("Is {i} odd?\nA. yes\nB. no\nC. maybe\nAnswer:");
        assert_eq!(it["prompt"], ctx.as_str());
        let lls: Vec<f64> = it["scores"]["loglikelihoods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (k, letter) in ["A", "B", "C"].iter().enumerate() {
            let c = tok.encode(&ctx, false).unwrap();
            let whole = tok.encode(&format!("{ctx} {letter}"), false).unwrap();
            let cont = whole[c.len()..].to_vec();
            let mut ids = c.clone();
            ids.extend(&cont);
            let mut labels = vec![IGNORE_INDEX; c.len()];
            labels.extend(cont.iter().map(|&t| t as i64));
            let mean = host_mean_nll(&model, &[(ids, labels)])[0];
            let ll = -mean * cont.len() as f64;
            assert!(
                (lls[k] - ll).abs() < 1e-4,
                "item {i} {letter}: {} vs {ll}",
                lls[k]
            );
        }
        let pred = (0..3)
            .max_by(|&a, &b| lls[a].partial_cmp(&lls[b]).unwrap().then(b.cmp(&a)))
            .unwrap();
        assert_eq!(it["scores"]["prediction"].as_u64(), Some(pred as u64));
        let ok = pred == i % 3;
        correct += ok as usize;
        let e = by_subject
            .entry(it["subject"].as_str().unwrap().to_string())
            .or_default();
        e.0 += ok as usize;
        e.1 += 1;
    }
    assert_eq!(f(&summary, "quiz_acc"), correct as f64 / 6.0);
    for (s, (c, n)) in by_subject {
        assert_eq!(
            summary["quiz_acc_by_subject"][&s].as_f64(),
            Some(c as f64 / n as f64)
        );
    }
}

fn err_of(req: &EvalRequest) -> String {
    match evaluate(req) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let data = tofu_data();
    let dir = data.path();
    // a split file that does not exist
    let mut req = tofu_request(dir, &["forget"]);
    req.data[0].spec = Some(dir.join("nope.json").display().to_string());
    let e = err_of(&req);
    assert!(
        e.contains("nope.json") && e.contains("split 'forget'"),
        "{e}"
    );

    // a forget row without perturbed answers: the file and the record are named
    let mut rows = tofu_rows("F");
    rows[2].as_object_mut().unwrap().remove("perturbed_answer");
    let bad = dir.join("bad_forget.jsonl");
    write_jsonl(&bad, &rows);
    let req = request("tofu", &[("forget", bad.clone())]);
    let e = err_of(&req);
    assert!(
        e.contains("bad_forget.jsonl") && e.contains("record 3") && e.contains("perturbed_answer"),
        "{e}"
    );
    // a holdout row needs only question and answer, so the same file passes as holdout
    let req = request("tofu", &[("holdout", bad.clone())]);
    assert!(evaluate(&req).is_ok());
    // a wrong type
    let mut rows = tofu_rows("F");
    rows[0]["answer"] = json!(7);
    write_jsonl(&bad, &rows);
    let e = err_of(&request("tofu", &[("retain", bad.clone())]));
    assert!(
        e.contains("record 1") && e.contains("'answer' must be a string"),
        "{e}"
    );

    // an empty set
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let e = err_of(&request("tofu", &[("forget", empty.clone())]));
    assert!(e.contains("empty.jsonl") && e.contains("no records"), "{e}");
    let e = err_of(&request("tofu", &[]));
    assert!(e.contains("no --data") && e.contains("forget"), "{e}");

    // a split the suite does not know, and a split given twice
    let e = err_of(&request("tofu", &[("bogus", split_path(dir, "forget"))]));
    assert!(
        e.contains("no split 'bogus'") && e.contains("retain"),
        "{e}"
    );
    let e = err_of(&request(
        "tofu",
        &[
            ("forget", split_path(dir, "forget")),
            ("forget", split_path(dir, "forget")),
        ],
    ));
    assert!(e.contains("twice"), "{e}");

    // a retain log of another suite
    let ppl_out = dir.join("ppl");
    let (_, _, _) = run_and_read(
        &request("perplexity", &[("forget", split_path(dir, "forget"))]),
        &ppl_out,
    );
    let mut req = tofu_request(dir, &["forget"]);
    req.reference = Some(Reference::Log(ppl_out.join("EVAL.json")));
    let e = err_of(&req);
    assert!(
        e.contains("EVAL.json") && e.contains("'perplexity' suite") && e.contains("tofu"),
        "{e}"
    );
    // a retain log that is no log at all, or missing
    let junk = dir.join("junk.json");
    std::fs::write(&junk, "{\"hello\": 1}").unwrap();
    req.reference = Some(Reference::Log(junk));
    assert!(err_of(&req).contains("not an evaluation log"));
    req.reference = Some(Reference::Log(dir.join("missing.json")));
    assert!(err_of(&req).contains("missing.json"));
    // a retain reference without a forget split
    let mut req = tofu_request(dir, &["retain"]);
    req.reference = Some(Reference::Model {
        dir: fixture("llama"),
        label: "llama".into(),
    });
    assert!(err_of(&req).contains("need the 'forget' split"));
    // a retain reference for a suite other than tofu
    let mut req = request("perplexity", &[("forget", split_path(dir, "forget"))]);
    req.reference = Some(Reference::Model {
        dir: fixture("llama"),
        label: "llama".into(),
    });
    assert!(err_of(&req).contains("apply to tofu suites"));

    // mcq rows: answer out of range, choices not a list
    let q = dir.join("q.jsonl");
    write_jsonl(
        &q,
        &[
            json!({"question": "a?", "choices": ["x", "y"], "answer": 1}),
            json!({"question": "b?", "choices": ["x", "y"], "answer": 2}),
        ],
    );
    let e = err_of(&request("mcq", &[("quiz", q.clone())]));
    assert!(
        e.contains("q.jsonl") && e.contains("record 2") && e.contains("only 2 choices"),
        "{e}"
    );
    write_jsonl(&q, &[json!({"question": "a?", "choices": 3, "answer": 0})]);
    let e = err_of(&request("mcq", &[("quiz", q.clone())]));
    assert!(e.contains("'choices' must be a list of strings"), "{e}");
    // perplexity rows need text or question + answer
    write_jsonl(&q, &[json!({"prompt": "x"})]);
    let e = err_of(&request("perplexity", &[("x", q.clone())]));
    assert!(e.contains("record 1") && e.contains("'text'"), "{e}");

    // suite files: unknown key, unknown suite
    let s = dir.join("s.toml");
    std::fs::write(&s, "name = \"x\"\nkind = \"tofu\"\nbogus_key = 1\n").unwrap();
    let e = Suite::resolve(s.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("s.toml") && e.contains("bogus_key"), "{e}");
    let e = Suite::resolve("nonesuch").unwrap_err().to_string();
    assert!(e.contains("tofu, perplexity, mcq"), "{e}");
    assert!(DataArg::parse("forget=").is_err() && DataArg::parse("=x").is_err());
    assert_eq!(
        DataArg::parse("forget").unwrap(),
        DataArg {
            split: "forget".into(),
            spec: None
        }
    );
}

fn unlearn_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_unlearn"))
}

#[test]
fn cli_eval_writes_the_three_files() {
    let data = tofu_data();
    let dir = data.path();
    let out = dir.join("out");
    let arg = |s: &str| format!("{s}={}", split_path(dir, s).display());
    let o = unlearn_cmd()
        .args(["eval", "--model"])
        .arg(fixture("llama"))
        .arg("--adapter")
        .arg(fixture("llama-lora"))
        .args([
            "--suite",
            "tofu",
            "--data",
            &arg("forget"),
            "--data",
            &arg("holdout"),
        ])
        .args(["--data", &arg("wf"), "--retain-model"])
        .arg(fixture("llama-lora-merged"))
        .args(["--max-new-tokens", "6", "--batch-size", "3", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("SUMMARY.json")).unwrap()).unwrap();
    for key in [
        "forget_quality",
        "model_utility",
        "privleak",
        "wf_Q_A_ROUGE",
    ] {
        assert!(summary[key].is_number(), "{key}: {summary}");
    }
    let log: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("EVAL.json")).unwrap()).unwrap();
    assert_eq!(log["settings"]["generation"]["max_new_tokens"], 6);
    assert_eq!(log["settings"]["scoring"]["batch_size"], 3);
    assert!(std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("forget_quality"));

    // --retain-model and --retain-log exclude each other; a bad split file fails cleanly
    let o = unlearn_cmd()
        .args(["eval", "--model"])
        .arg(fixture("llama"))
        .args([
            "--data",
            &arg("forget"),
            "--retain-model",
            "x",
            "--retain-log",
            "y",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
    let o = unlearn_cmd()
        .args(["eval", "--model"])
        .arg(fixture("llama"))
        .args(["--data", "forget=/nonexistent/f.json", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/f.json"), "{err}");
}

/// `--data forget` reads the suite's hf:// source; hf:// paths resolve offline from a cache in
/// huggingface_hub's layout.
#[test]
fn cli_eval_reads_hf_dataset_specs_from_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("datasets--locuslab--TOFU");
    let sha = "89abcdef0123456789abcdef0123456789abcdef";
    let snap = repo.join("snapshots").join(sha);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    write_jsonl(&snap.join("forget10_perturbed.json"), &tofu_rows("F"));
    write_jsonl(&snap.join("holdout10.json"), &tofu_rows("H"));
    let out = cache.path().join("out");
    let o = unlearn_cmd()
        .args(["eval", "--model"])
        .arg(fixture("llama"))
        .args([
            "--data",
            "forget",
            "--data",
            "holdout=hf://datasets/locuslab/TOFU/holdout10.json",
            "--max-new-tokens",
            "4",
            "--limit",
            "4",
            "--out",
        ])
        .arg(&out)
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("EVAL.json")).unwrap()).unwrap();
    assert_eq!(
        log["splits"]["forget"]["source"],
        "hf://datasets/locuslab/TOFU/forget10_perturbed.json"
    );
    assert_eq!(
        log["splits"]["holdout"]["items"].as_array().unwrap().len(),
        4
    );
    assert!(log["summary"]["privleak"].is_number());
}

/// `unlearn run` evaluates the retain model once and reuses that evaluation, but only while
/// the retain model, suite, data and settings are what it was computed from.
#[test]
fn run_evaluator_reuses_the_retain_model_evaluation_only_while_its_inputs_are_unchanged() {
    use unlearn::recipe::EvalSection;
    use unlearn::train::evaluation::{RunEvaluator, RETAIN_INPUTS_FILE};
    let data = tofu_data();
    let dir = data.path();
    let forget = split_path(dir, "forget");
    let section: EvalSection = toml::from_str(&format!(
        "suite = \"tofu\"\ndata = [\"forget={}\"]\nretain_model = \"{}\"\nmax_new_tokens = 4\n",
        forget.display(),
        fixture("llama-lora-merged").display()
    ))
    .unwrap();
    let out = dir.join("run");
    let cache = out.join("evals/retain-model");
    let new = |s: &EvalSection| {
        RunEvaluator::new(
            s,
            &fixture("llama"),
            "llama",
            &cpu(),
            &out,
            Default::default(),
        )
        .unwrap()
    };
    let forget_items = |log: &Path| -> usize {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(log).unwrap()).unwrap();
        v["splits"]["forget"]["items"].as_array().unwrap().len()
    };
    new(&section);
    let log = cache.join("EVAL.json");
    let rows_at_first = forget_items(&log);
    assert!(cache.join(RETAIN_INPUTS_FILE).exists());
    // unchanged inputs: the cached file is reused as it is (a marker put in it survives)
    std::fs::write(&log, "marker").unwrap();
    new(&section);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "marker");
    // the forget split loses a record: the retain model is evaluated again on the new data
    let mut rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&forget).unwrap()).unwrap();
    rows.pop();
    std::fs::write(&forget, serde_json::to_string(&rows).unwrap()).unwrap();
    new(&section);
    assert_eq!(forget_items(&log), rows_at_first - 1);
    // …and so does a changed setting
    std::fs::write(&log, "marker").unwrap();
    let mut fewer = section.clone();
    fewer.limit = Some(2);
    new(&fewer);
    assert_eq!(forget_items(&log), 2);
}
