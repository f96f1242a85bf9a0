//! The `muse` suite on the tiny Llama fixture: summary keys, ROUGE-L F1 recomputed from the
//! stored generations, the few-shot prompt, MIA AUCs and privleak against a retain model or log,
//! and clear errors for bad rows and bad suites.
mod common;
use common::*;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use unlearn::eval::muse::{icl_prefix, knowmem_prompt};
use unlearn::eval::{evaluate, write_outputs, DataArg, EvalRequest, Reference, Suite};
use unlearn::metrics::{mia_auc, privleak, rouge};
use unlearn::tokenizer::ChatTokenizer;

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn qa_rows(prefix: &str, n: usize) -> Vec<Value> {
    let jobs = ["poet", "baker", "pilot", "judge"];
    (0..n)
        .map(|i| {
            json!({
                "question": format!("Who is {prefix}{i}?"),
                "answer": format!("{prefix}{i} is a {}.", jobs[i % 4]),
            })
        })
        .collect()
}

fn verbmem_rows() -> Vec<Value> {
    ["The sea was", "A red fox", "Rain fell on"]
        .iter()
        .map(|p| json!({"prompt": p, "gt": "the old town by the hill."}))
        .collect()
}

fn text_rows(prefix: &str) -> Vec<Value> {
    [
        "The cat sat on the mat.",
        "A dog ran in the park today.",
        "We ate bread and soup.",
        "The sun is hot in June.",
        "Birds sing at dawn.",
    ]
    .iter()
    .map(|t| json!({ "text": format!("{prefix} {t}") }))
    .collect()
}

/// Every muse split as a JSONL file in a temp dir.
fn muse_data() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write_jsonl(&p.join("knowmem_forget.jsonl"), &qa_rows("F", 3));
    write_jsonl(&p.join("knowmem_forget_icl.jsonl"), &qa_rows("K", 2));
    write_jsonl(&p.join("knowmem_retain.jsonl"), &qa_rows("R", 3));
    write_jsonl(&p.join("knowmem_retain_icl.jsonl"), &qa_rows("L", 2));
    write_jsonl(&p.join("verbmem_forget.jsonl"), &verbmem_rows());
    write_jsonl(&p.join("forget.jsonl"), &text_rows("Forget:"));
    write_jsonl(&p.join("holdout.jsonl"), &text_rows("Held:"));
    write_jsonl(&p.join("retain.jsonl"), &text_rows("Kept:"));
    dir
}

const ALL: [&str; 8] = [
    "knowmem_forget",
    "knowmem_forget_icl",
    "knowmem_retain",
    "knowmem_retain_icl",
    "verbmem_forget",
    "forget",
    "holdout",
    "retain",
];

fn request(suite: Suite, dir: &Path, splits: &[&str]) -> EvalRequest {
    EvalRequest {
        suite,
        data: splits
            .iter()
            .map(|s| DataArg {
                split: s.to_string(),
                spec: Some(dir.join(format!("{s}.jsonl")).display().to_string()),
            })
            .collect(),
        model: fixture("llama"),
        model_label: "llama".into(),
        adapter: None,
        reference: None,
        batch_size: Some(2),
        max_new_tokens: Some(8),
        limit: None,
        device: cpu(),
        progress: false,
        prompt_style: Default::default(),
    }
}

fn muse_request(dir: &Path, splits: &[&str]) -> EvalRequest {
    request(Suite::resolve("muse").unwrap(), dir, splits)
}

fn run_and_read(req: &EvalRequest, out: &Path) -> (Value, Map<String, Value>, String) {
    let o = evaluate(req).unwrap();
    write_outputs(out, &o).unwrap();
    let log: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("EVAL.json")).unwrap()).unwrap();
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("SUMMARY.json")).unwrap()).unwrap();
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    (log, summary.as_object().unwrap().clone(), report)
}

fn f(summary: &Map<String, Value>, key: &str) -> f64 {
    summary
        .get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("summary has no number '{key}': {summary:?}"))
}

fn items<'a>(log: &'a Value, split: &str) -> &'a Vec<Value> {
    log["splits"][split]["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no split {split}"))
}

fn scores(log: &Value, split: &str, key: &str) -> Vec<f64> {
    items(log, split)
        .iter()
        .map(|it| it["scores"][key].as_f64().unwrap())
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

/// ROUGE-L F1 of each item, recomputed from its stored generation, against `reference_key`.
fn check_rouge(log: &Value, split: &str, reference_key: &str, summary_value: f64) {
    let mut f1s = vec![];
    for it in items(log, split) {
        let reference = it[reference_key].as_str().unwrap();
        let generation = it["generation"].as_str().unwrap();
        let r = rouge(reference.trim(), generation);
        let stored = it["scores"]["rougeL_f1"].as_f64().unwrap();
        assert!(
            close(r.rouge_l.fmeasure, stored),
            "{split}: {stored} vs {}",
            r.rouge_l.fmeasure
        );
        assert!(close(
            r.rouge_l.recall,
            it["scores"]["rougeL_recall"].as_f64().unwrap()
        ));
        assert!(it["generation_tokens"].as_u64().unwrap() <= 8);
        f1s.push(stored);
    }
    assert!(close(mean(&f1s), summary_value), "{split} mean");
}

#[test]
fn muse_suite_keys_rouge_and_privleak() {
    let data = muse_data();
    let dir = data.path();
    let out = dir.join("out");
    let (log, summary, report) = run_and_read(&muse_request(dir, &ALL), &out);
    for key in [
        "forget_knowmem_ROUGE",
        "retain_knowmem_ROUGE",
        "forget_verbmem_ROUGE",
        "extraction_strength",
        "exact_memorization",
        "privleak",
        "mia_loss",
        "mia_zlib",
        "mia_min_k",
        "mia_min_k_plus_plus",
        "retain_mia_min_k",
    ] {
        let v = f(&summary, key);
        assert!(v.is_finite(), "{key} = {v}");
    }
    assert_eq!(log["suite_kind"], "muse");
    check_rouge(
        &log,
        "knowmem_forget",
        "answer",
        f(&summary, "forget_knowmem_ROUGE"),
    );
    check_rouge(
        &log,
        "knowmem_retain",
        "answer",
        f(&summary, "retain_knowmem_ROUGE"),
    );
    check_rouge(
        &log,
        "verbmem_forget",
        "gt",
        f(&summary, "forget_verbmem_ROUGE"),
    );
    assert!(close(
        mean(&scores(&log, "verbmem_forget", "extraction_strength")),
        f(&summary, "extraction_strength")
    ));

    // the MIA AUCs from the per-text scores; privleak against the default reference AUC 0.5
    for attack in ["mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"] {
        let auc = mia_auc(
            &scores(&log, "forget", attack),
            &scores(&log, "holdout", attack),
        )
        .unwrap();
        assert!(close(auc, f(&summary, attack)), "{attack}");
    }
    let retain_auc = mia_auc(
        &scores(&log, "retain", "mia_min_k"),
        &scores(&log, "holdout", "mia_min_k"),
    )
    .unwrap();
    assert!(close(retain_auc, f(&summary, "retain_mia_min_k")));
    assert!(close(
        privleak(f(&summary, "mia_min_k"), None).unwrap(),
        f(&summary, "privleak")
    ));
    // per-text loss is the mean NLL
    for it in items(&log, "forget") {
        assert_eq!(it["scores"]["mia_loss"], it["scores"]["avg_loss"]);
        assert!(it["text"].as_str().unwrap().starts_with("Forget:"));
    }

    // the few-shot prompt: both in-context examples, then the question
    let tok = ChatTokenizer::from_dir(&fixture("llama")).unwrap();
    let icl: Vec<(String, String)> = qa_rows("K", 2)
        .iter()
        .map(|r| {
            (
                r["question"].as_str().unwrap().to_string(),
                r["answer"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let prefix = icl_prefix("", &icl);
    assert!(
        prefix.starts_with("Question: Who is K0?\nAnswer: K0 is a poet.\n\nQuestion: Who is K1?")
    );
    let notes = log["notes"].to_string();
    for (i, it) in items(&log, "knowmem_forget").iter().enumerate() {
        assert_eq!(it["shots"], 2);
        let q = format!("Who is F{i}?");
        assert_eq!(it["question"], q.as_str());
        let full = tok.encode(&knowmem_prompt(&prefix, &q), true).unwrap();
        // the fixture has 64 positions: a longer prompt keeps BOS and its last 64 − 8 − 1 tokens
        let stored = it["prompt_tokens"].as_u64().unwrap() as usize;
        assert_eq!(stored, full.len().min(64 - 8));
        if full.len() > 56 {
            assert!(notes.contains("lost their first tokens"), "{notes}");
        }
    }
    assert!(
        notes.contains("2-shot prompts from knowmem_forget_icl"),
        "{notes}"
    );
    assert!(notes.contains("reference AUC 0.5"), "{notes}");
    // the in-context examples are recorded, unscored
    assert_eq!(items(&log, "knowmem_forget_icl").len(), 2);

    assert!(report.contains("forget_verbmem_ROUGE") && report.contains("privleak"));
    assert!(!out.join("truth_ratio_hist.svg").exists());
    assert_eq!(log["settings"]["generation"]["max_new_tokens"], 8);
}

#[test]
fn muse_works_with_the_splits_present_and_shots_limit_and_split_lengths() {
    let data = muse_data();
    let dir = data.path();
    // only knowmem, without its examples: zero-shot, and no privleak keys
    let (log, summary, _) = run_and_read(&muse_request(dir, &["knowmem_forget"]), &dir.join("a"));
    assert!(summary.contains_key("forget_knowmem_ROUGE"));
    assert!(!summary.contains_key("privleak") && !summary.contains_key("retain_knowmem_ROUGE"));
    assert!(log["notes"].to_string().contains("zero-shot"));
    assert_eq!(items(&log, "knowmem_forget")[0]["shots"], 0);

    // forget texts without holdout: no AUC, a note
    let (log, summary, _) = run_and_read(&muse_request(dir, &["forget"]), &dir.join("b"));
    assert!(!summary.contains_key("mia_min_k"));
    assert!(log["notes"].to_string().contains("need both"));

    // --limit shortens evaluated splits, never the in-context examples
    let mut req = muse_request(dir, &["knowmem_retain", "knowmem_retain_icl"]);
    req.limit = Some(1);
    let (log, _, _) = run_and_read(&req, &dir.join("c"));
    assert_eq!(items(&log, "knowmem_retain").len(), 1);
    assert_eq!(items(&log, "knowmem_retain")[0]["shots"], 2);

    // a custom muse suite: prompt.shots = 1, the split's own generation length and stop strings
    let toml = dir.join("m.toml");
    std::fs::write(
        &toml,
        "name = \"m\"\nkind = \"muse\"\n[prompt]\nadd_bos = true\nshots = 1\n\
         [splits.knowmem_retain]\nmax_new_tokens = 3\nstop = [\"\\n\"]\n\
         [splits.knowmem_retain_icl]\n",
    )
    .unwrap();
    let suite = Suite::resolve(toml.to_str().unwrap()).unwrap();
    let mut req = request(
        suite.clone(),
        dir,
        &["knowmem_retain", "knowmem_retain_icl"],
    );
    req.max_new_tokens = None;
    let (log, _, _) = run_and_read(&req, &dir.join("d"));
    let tok = ChatTokenizer::from_dir(&fixture("llama")).unwrap();
    let prefix = icl_prefix("", &[("Who is L0?".into(), "L0 is a poet.".into())]);
    for (i, it) in items(&log, "knowmem_retain").iter().enumerate() {
        assert_eq!(it["shots"], 1);
        // the 1-shot prompt, cut to the 64 − 3 positions left for 3 new tokens
        let ids = tok
            .encode(&knowmem_prompt(&prefix, &format!("Who is R{i}?")), true)
            .unwrap();
        assert_eq!(
            it["prompt_tokens"].as_u64().unwrap() as usize,
            ids.len().min(61)
        );
        assert!(it["generation_tokens"].as_u64().unwrap() <= 3);
        assert!(!it["generation"].as_str().unwrap().contains('\n'));
    }
    // short in-context examples: the whole prompt fits, and greedy decoding of exactly
    // "Question: Q?\nAnswer: A.\n\nQuestion: {q}\nAnswer: " (with BOS) gives the stored text
    write_jsonl(
        &dir.join("knowmem_retain_icl.jsonl"),
        &[
            json!({"question": "Q?", "answer": "A."}),
            json!({"question": "P?", "answer": "B."}),
        ],
    );
    let mut req = request(
        suite.clone(),
        dir,
        &["knowmem_retain", "knowmem_retain_icl"],
    );
    req.max_new_tokens = None;
    req.batch_size = Some(1);
    let (log, _, _) = run_and_read(&req, &dir.join("d2"));
    let lm =
        unlearn::eval::lm::Lm::load(&fixture("llama"), None, &cpu(), &Default::default()).unwrap();
    let bar = indicatif::ProgressBar::hidden();
    for (i, it) in items(&log, "knowmem_retain").iter().enumerate() {
        let prompt = format!("Question: Q?\nAnswer: A.\n\nQuestion: Who is R{i}?\nAnswer: ");
        let ids = tok.encode(&prompt, true).unwrap();
        assert!(ids.len() <= 61, "{}", ids.len());
        assert_eq!(it["prompt_tokens"].as_u64().unwrap() as usize, ids.len());
        let expected =
            unlearn::eval::lm::generate(&lm, &[ids], 3, 1, &["\n".to_string()], &bar).unwrap();
        assert_eq!(it["generation"], expected[0].0.as_str());
        assert_eq!(it["generation_tokens"], expected[0].1.len());
    }
    // --max-new-tokens overrides the split's length
    let mut req = request(suite, dir, &["knowmem_retain"]);
    req.max_new_tokens = Some(5);
    let (log, _, _) = run_and_read(&req, &dir.join("e"));
    assert_eq!(log["settings"]["generation"]["max_new_tokens"], 5);
    assert!(log["settings"]["splits"]["knowmem_retain"]
        .get("max_new_tokens")
        .is_none());
}

#[test]
fn privleak_against_a_retain_model_and_logs() {
    let data = muse_data();
    let dir = data.path();
    let splits = ["forget", "holdout"];
    // the same model as its own reference: privleak 0
    let mut req = muse_request(dir, &splits);
    req.reference = Some(Reference::Model {
        dir: fixture("llama"),
        label: "llama".into(),
    });
    let (log, summary, _) = run_and_read(&req, &dir.join("m"));
    assert!(f(&summary, "privleak").abs() < 1e-6, "{summary:?}");
    assert!(close(
        log["reference"]["values"]["mia_min_k"].as_f64().unwrap(),
        f(&summary, "mia_min_k")
    ));

    // an adapted model against the base model's EVAL.json
    let base_out = dir.join("base");
    let (_, base, _) = run_and_read(&muse_request(dir, &splits), &base_out);
    let mut req = muse_request(dir, &splits);
    req.adapter = Some(fixture("llama-lora"));
    req.reference = Some(Reference::Log(base_out.join("EVAL.json")));
    let (_, summary, _) = run_and_read(&req, &dir.join("l"));
    let expected = privleak(f(&summary, "mia_min_k"), Some(f(&base, "mia_min_k"))).unwrap();
    assert!(close(expected, f(&summary, "privleak")));

    // open-unlearning's MUSE_EVAL.json
    let ou = dir.join("MUSE_EVAL.json");
    std::fs::write(
        &ou,
        r#"{"mia_min_k": {"agg_value": 0.75}, "forget_knowmem_ROUGE": {"agg_value": 0.3}}"#,
    )
    .unwrap();
    let mut req = muse_request(dir, &splits);
    req.reference = Some(Reference::Log(ou));
    let (_, summary, _) = run_and_read(&req, &dir.join("o"));
    let expected = privleak(f(&summary, "mia_min_k"), Some(0.75)).unwrap();
    assert!(close(expected, f(&summary, "privleak")));
}

fn err_of(req: &EvalRequest) -> String {
    match evaluate(req) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_rows_splits_references_and_suites_are_clear_errors() {
    let data = muse_data();
    let dir = data.path();
    let suite = || Suite::resolve("muse").unwrap();
    let with = |split: &str, rows: &[Value]| {
        let p = dir.join(format!("{split}.jsonl"));
        write_jsonl(&p, rows);
        request(suite(), dir, &[split])
    };
    // a knowmem row without its answer: the file, the record and the field are named
    let mut rows = qa_rows("F", 3);
    rows[1].as_object_mut().unwrap().remove("answer");
    let e = err_of(&with("knowmem_forget", &rows));
    assert!(
        e.contains("knowmem_forget.jsonl")
            && e.contains("record 2")
            && e.contains("missing field 'answer'"),
        "{e}"
    );
    // in-context examples need questions too
    let mut rows = qa_rows("K", 2);
    rows[0].as_object_mut().unwrap().remove("question");
    let e = err_of(&with("knowmem_forget_icl", &rows));
    assert!(e.contains("record 1") && e.contains("'question'"), "{e}");
    // verbmem rows need prompt and gt
    let e = err_of(&with("verbmem_forget", &[json!({"prompt": "a b c"})]));
    assert!(
        e.contains("missing field 'gt'") && e.contains("verbmem"),
        "{e}"
    );
    let e = err_of(&with("verbmem_forget", &[json!({"prompt": 3, "gt": "x"})]));
    assert!(e.contains("'prompt' must be a string"), "{e}");
    // text splits need text
    let e = err_of(&with(
        "holdout",
        &[json!({"question": "q?", "answer": "a"})],
    ));
    assert!(
        e.contains("holdout.jsonl") && e.contains("missing field 'text'"),
        "{e}"
    );
    // an empty split
    let e = err_of(&with("retain", &[]));
    assert!(e.contains("no records"), "{e}");

    // a split the suite does not know
    let data = muse_data();
    let dir = data.path();
    let mut req = muse_request(dir, &["forget"]);
    req.data[0].split = "wiki".into();
    let e = err_of(&req);
    assert!(
        e.contains("no split 'wiki'") && e.contains("knowmem_forget"),
        "{e}"
    );

    // a retain reference needs forget and holdout texts
    let mut req = muse_request(dir, &["forget"]);
    req.reference = Some(Reference::Model {
        dir: fixture("llama"),
        label: "llama".into(),
    });
    let e = err_of(&req);
    assert!(e.contains("'forget' and 'holdout'"), "{e}");
    // a retain log of another suite kind, or without the AUC
    let tofu_log = dir.join("tofu_eval.json");
    std::fs::write(
        &tofu_log,
        r#"{"suite": "tofu", "suite_kind": "tofu", "summary": {}}"#,
    )
    .unwrap();
    let mut req = muse_request(dir, &["forget", "holdout"]);
    req.reference = Some(Reference::Log(tofu_log));
    let e = err_of(&req);
    assert!(e.contains("'tofu' suite") && e.contains("muse"), "{e}");
    let no_auc = dir.join("no_auc.json");
    std::fs::write(
        &no_auc,
        r#"{"suite": "muse", "suite_kind": "muse", "summary": {}}"#,
    )
    .unwrap();
    req.reference = Some(Reference::Log(no_auc));
    assert!(err_of(&req).contains("mia_min_k"));

    // suite files
    let bad = |text: &str| {
        let p = dir.join("bad.toml");
        std::fs::write(&p, text).unwrap();
        Suite::resolve(p.to_str().unwrap()).unwrap_err().to_string()
    };
    let e = bad("name = \"m\"\nkind = \"muse\"\n[splits.wiki]\n");
    assert!(
        e.contains("bad.toml") && e.contains("splits.wiki") && e.contains("knowmem_NAME"),
        "{e}"
    );
    let e = bad(
        "name = \"t\"\nkind = \"tofu\"\n[splits.forget]\nmetrics = [\"mia\"]\nmax_new_tokens = 3\n",
    );
    assert!(e.contains("apply to kind = \"muse\""), "{e}");
    let e = bad("name = \"q\"\nkind = \"mcq\"\nany_split = true\n[prompt]\nshots = 2\n");
    assert!(e.contains("prompt.shots"), "{e}");
    let e = bad("name = \"m\"\nkind = \"muse\"\nany_split = true\n[splits.forget]\n");
    assert!(e.contains("any_split"), "{e}");
}

#[test]
fn cli_eval_muse() {
    let data = muse_data();
    let dir = data.path();
    let out = dir.join("out");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_unlearn"));
    cmd.args(["eval", "--model"])
        .arg(fixture("llama"))
        .args(["--suite", "muse"]);
    for s in [
        "knowmem_forget",
        "knowmem_forget_icl",
        "verbmem_forget",
        "forget",
        "holdout",
    ] {
        cmd.arg("--data")
            .arg(format!("{s}={}", dir.join(format!("{s}.jsonl")).display()));
    }
    let o = cmd
        .args(["--max-new-tokens", "8", "--batch-size", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("SUMMARY.json")).unwrap()).unwrap();
    for key in [
        "forget_knowmem_ROUGE",
        "forget_verbmem_ROUGE",
        "privleak",
        "extraction_strength",
    ] {
        assert!(summary[key].is_number(), "{key}: {summary}");
    }
    let _: PathBuf = out.join("report.md");
    assert!(out.join("report.md").is_file());
}
