//! End to end through the binary, offline: `unlearn train` builds a model from the bundled
//! recipe (4 steps), `unlearn run` unlearns on it with the quickstart recipe and evaluates with
//! the tofu suite before and after; and the bundled models are what the README says.
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn unlearn(args: &[&str], cwd: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_unlearn"))
        .args(args)
        .current_dir(cwd)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "unlearn {args:?} failed:\n{text}");
    text
}

fn summary(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

#[test]
fn train_then_run_the_quickstart_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let set = |kv: String| kv;
    let train_dir = tmp.path().join("train");
    unlearn(
        &[
            "train",
            repo("recipes/build/retain.toml").to_str().unwrap(),
            "--set",
            "train.steps=4",
            "--set",
            "train.batch_size=4",
            "--set",
            &set(format!("output.dir=\"{}\"", train_dir.display())),
            "--set",
            &set(format!("output.model=\"{}\"", model.display())),
        ],
        &repo(""),
    );
    let metrics = std::fs::read_to_string(train_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(model.join(f).is_file(), "trained model lacks {f}");
    }

    // the quickstart recipe, run from another directory (paths resolve against the recipe)
    let run_dir = tmp.path().join("quick");
    unlearn(
        &[
            "run",
            repo("recipes/quickstart.toml").to_str().unwrap(),
            "--set",
            &format!("model.path=\"{}\"", model.display()),
            "--set",
            &format!("eval.retain_model=\"{}\"", model.display()),
            "--set",
            "train.steps=4",
            "--set",
            "train.batch_size=4",
            "--set",
            "eval.limit=6",
            "--set",
            "eval.max_new_tokens=8",
            "--set",
            &format!("output.dir=\"{}\"", run_dir.display()),
        ],
        tmp.path(),
    );
    let before = summary(&run_dir.join("evals/step-000000/SUMMARY.json"));
    let after = summary(&run_dir.join("evals/step-000004/SUMMARY.json"));
    for s in [&before, &after] {
        for key in [
            "forget_quality",
            "model_utility",
            "forget_Q_A_Prob",
            "privleak",
        ] {
            let v = s[key].as_f64().unwrap_or_else(|| panic!("no {key} in {s}"));
            assert!(v.is_finite(), "{key} = {v}");
        }
    }
    // the retain model is the model itself here: before unlearning their truth ratios agree
    let fq = before["forget_quality"].as_f64().unwrap();
    assert!(
        (fq - 1.0).abs() < 1e-9,
        "identical truth ratios give p = 1, got {fq}"
    );
    // `unlearn compare` reports the first and last evaluation of the run
    let line = unlearn(
        &["compare", "--json", run_dir.to_str().unwrap()],
        tmp.path(),
    );
    let row: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(row["method"], "eupmu");
    assert_eq!(row["steps"], 4);
    for key in ["model_utility", "forget_Q_A_Prob"] {
        assert_eq!(row[format!("{key}_before")], before[key], "{key}");
        assert_eq!(row[format!("{key}_after")], after[key], "{key}");
    }
    let table = unlearn(&["compare", run_dir.to_str().unwrap()], tmp.path());
    assert!(
        table.starts_with("| run | method | steps | forget_quality |"),
        "{table}"
    );
    assert!(run_dir.join("adapter/adapter_model.safetensors").is_file());
    assert!(run_dir.join("merged/model.safetensors").is_file());
    assert!(
        run_dir.join("report.md").is_file()
            || run_dir.join("evals/step-000004/report.md").is_file()
    );
}

/// The committed models: the target has memorised forget10 (Q_A_Prob ≥ 0.8 over the whole
/// split), the retain model has not seen it, and both know the retain people.
#[test]
fn bundled_target_memorised_the_forget_set_and_retain_model_did_not() {
    let tmp = tempfile::tempdir().unwrap();
    let prob = |model: &str, split: &str, file: &str| -> f64 {
        let out = tmp
            .path()
            .join(format!("{}-{split}", model.replace('/', "_")));
        unlearn(
            &[
                "eval",
                "--model",
                repo(model).to_str().unwrap(),
                "--suite",
                "perplexity",
                "--data",
                &format!("{split}={}", repo(file).display()),
                "--out",
                out.to_str().unwrap(),
            ],
            &repo(""),
        );
        let s = summary(&out.join("SUMMARY.json"));
        // exp(−mean over items of the item's mean NLL) ≤ mean over items of exp(−item NLL) =
        // tofu's Q_A_Prob (Jensen), so a bound on this one bounds Q_A_Prob from below
        (-s[format!("{split}_item_nll")].as_f64().unwrap()).exp()
    };
    let target_forget = prob("data/models/target", "forget", "data/tofu/forget10.jsonl");
    let retain_forget = prob("data/models/retain", "forget", "data/tofu/forget10.jsonl");
    let target_retain = prob(
        "data/models/target",
        "retain",
        "data/tofu/retain_perturbed.jsonl",
    );
    let retain_retain = prob(
        "data/models/retain",
        "retain",
        "data/tofu/retain_perturbed.jsonl",
    );
    assert!(target_forget >= 0.8, "target forget prob {target_forget}");
    assert!(
        retain_forget < 0.5,
        "retain model forget prob {retain_forget}"
    );
    assert!(
        target_retain >= 0.8 && retain_retain >= 0.8,
        "{target_retain} {retain_retain}"
    );
}
