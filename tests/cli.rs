//! The command line: inspect, score and merge, end to end, plus scoring against transformers.
mod common;
use candle_core::DType;
use common::*;
use std::path::Path;
use std::process::Command;
use unlearn::model::{Decoder, ForwardOptions};
use unlearn::score::score_examples;
use unlearn::tokenizer::EncodedExample;

fn unlearn(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_unlearn"))
        .args(args)
        .output()
        .expect("run unlearn")
}

#[test]
fn inspect_reports_the_manifest_parameter_counts() {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("manifest.json")).unwrap()).unwrap();
    let mut checked = 0;
    for (name, entry) in manifest["fixtures"].as_object().unwrap() {
        let Some(params) = entry.get("params").and_then(|p| p.as_u64()) else {
            continue;
        };
        let out = unlearn(&["inspect", "--json", fixture(name).to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["parameters"].as_u64(), Some(params), "{name}");
        let arch = entry["architecture"].as_str().unwrap().to_lowercase();
        let mt = info["model_type"].as_str().unwrap().replace('_', "");
        assert!(arch.starts_with(&mt), "{name}: {arch} vs {mt}");
        checked += 1;
    }
    assert_eq!(checked, 9);
}

#[test]
fn score_of_reference_rows_equals_transformers_loss_at_any_batch_size() {
    for name in ["llama", "gemma2", "gpt2"] {
        let model = Decoder::load(&fixture(name), DType::F32, &cpu()).unwrap();
        let r = reference(name);
        let ids = r["input_ids"].to_vec2::<i64>().unwrap();
        let mask = r["attention_mask"].to_vec2::<i64>().unwrap();
        let labels = r["labels"].to_vec2::<i64>().unwrap();
        let examples: Vec<EncodedExample> = (0..ids.len())
            .map(|i| {
                let n = mask[i].iter().filter(|&&m| m == 1).count();
                EncodedExample {
                    input_ids: ids[i][..n].iter().map(|&x| x as u32).collect(),
                    labels: labels[i][..n].to_vec(),
                }
            })
            .collect();
        let expected = scalar(&r["loss"]) as f64;
        for bs in [1, 2] {
            let rows = score_examples(&model, &examples, bs, 2, &ForwardOptions::default(), |_| {})
                .unwrap();
            let sum: f64 = rows.iter().map(|r| r.sum_nll).sum();
            let tokens: usize = rows.iter().map(|r| r.tokens).sum();
            assert_eq!(
                tokens,
                labels.iter().flatten().filter(|&&l| l != -100).count() - ids.len()
            );
            let mean = sum / tokens as f64;
            assert!(
                (mean - expected).abs() < 1e-5,
                "{name} bs {bs}: {mean} vs {expected}"
            );
            for row in &rows {
                assert!((row.mean_nll - row.sum_nll / row.tokens as f64).abs() < 1e-12);
            }
        }
    }
}

#[test]
fn score_command_writes_one_line_per_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        "{\"question\": \"Where was Ana born?\", \"answer\": \"In Lisbon.\"}\n{\"text\": \"The quick brown fox.\"}\n{\"question\": \"Who?\", \"answer\": \"Nobody at all\"}\n",
    )
    .unwrap();
    let out = dir.path().join("scores.jsonl");
    let o = unlearn(&[
        "score",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--adapter",
        fixture("llama-lora").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
        let tokens = l["tokens"].as_u64().unwrap() as f64;
        let (mean, sum) = (
            l["mean_nll"].as_f64().unwrap(),
            l["sum_nll"].as_f64().unwrap(),
        );
        assert!(tokens > 0.0 && sum > 0.0 && (mean * tokens - sum).abs() < 1e-9);
    }
    // The adapter changes the scores.
    let out2 = dir.path().join("base.jsonl");
    let o = unlearn(&[
        "score",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert_ne!(
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&out2).unwrap()
    );
}

#[test]
fn bad_inputs_exit_non_zero_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let o = unlearn(&["inspect", dir.path().join("missing").to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("missing") && err.contains("no such local file or directory"),
        "{err}"
    );
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let o = unlearn(&[
        "score",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--data",
        empty.to_str().unwrap(),
        "--out",
        dir.path().join("o.jsonl").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("empty.jsonl") && err.contains("no records"),
        "{err}"
    );
    assert!(!dir.path().join("o.jsonl").exists(), "no partial output");
    let o = unlearn(&[
        "merge",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--adapter",
        dir.path().to_str().unwrap(),
        "--out",
        dir.path().join("m").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("adapter_config.json"));
    assert!(!dir.path().join("m").exists());
    // a missing data file: named, and the operating system's reason said once
    let o = unlearn(&[
        "score",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--data",
        dir.path().join("absent.jsonl").to_str().unwrap(),
        "--out",
        dir.path().join("o.jsonl").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("absent.jsonl"), "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
}

#[test]
fn merge_command_writes_a_loadable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let o = unlearn(&[
        "merge",
        "--model",
        fixture("qwen2").to_str().unwrap(),
        "--adapter",
        fixture("qwen2-lora").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = unlearn(&["inspect", "--json", out.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["stored_dtype"], "bf16");
}

/// A cache laid out as Python's huggingface_hub writes it (blobs, relative snapshot symlinks,
/// refs/main): `unlearn inspect org/name` works offline from it.
#[test]
fn inspect_a_hub_id_offline_from_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--acme--tiny-llama");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(sha)).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    for (i, f) in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .iter()
    .enumerate()
    {
        let blob = format!("blob{i}");
        std::fs::copy(fixture("llama").join(f), repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(
            format!("../../blobs/{blob}"),
            repo.join("snapshots").join(sha).join(f),
        )
        .unwrap();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_unlearn"))
        .args(["inspect", "--json", "acme/tiny-llama"])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["parameters"], 115008);
    // and a model the cache lacks is a clear offline error naming the file
    let o = Command::new(env!("CARGO_BIN_EXE_unlearn"))
        .args(["inspect", "acme/other"])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("config.json"),
        "{err}"
    );
}

/// `unlearn klom`: an ensemble compared with itself is at KLoM 0 on every split; the bundled
/// target against its retrained counterfactual is far from it on the forget set (the target has
/// memorised it) and close on the retain set (both were trained on it).
#[test]
fn klom_command_zero_on_identical_ensembles_and_high_for_the_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    // the first 10 items of each split keep the test fast
    let mut data = vec![];
    for (split, file) in [
        ("forget", "forget10.jsonl"),
        ("retain", "retain_perturbed.jsonl"),
    ] {
        let text = std::fs::read_to_string(root.join("data/tofu").join(file)).unwrap();
        let path = tmp.path().join(file);
        std::fs::write(&path, text.lines().take(10).collect::<Vec<_>>().join("\n")).unwrap();
        data.push(format!("{split}={}", path.display()));
    }
    let model = |m: &str| root.join("data/models").join(m).display().to_string();
    let (retain, retrained, target) = (model("retain"), model("retrained"), model("target"));
    let run = |oracles: &[&str], unlearned: &[&str], bins: &str| -> serde_json::Value {
        let mut args = vec!["klom", "--json", "--bins", bins, "--oracle"];
        args.extend(oracles);
        args.push("--unlearned");
        args.extend(unlearned);
        args.push("--data");
        args.extend(data.iter().map(String::as_str));
        let o = unlearn(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let same = run(&[&retain, &retrained], &[&retain, &retrained], "20");
    assert_eq!(same["klom_direction"], "unlearned||oracle");
    for key in ["forget_p95", "forget_mean", "retain_p95", "retain_mean"] {
        assert_eq!(same[key].as_f64().unwrap(), 0.0, "{key}: {same}");
    }
    let target_vs = run(&[&retain, &retrained], &[&target, &target], "5");
    let forget = target_vs["forget_mean"].as_f64().unwrap();
    let retain_value = target_vs["retain_mean"].as_f64().unwrap();
    assert!(forget > 5.0, "{target_vs}");
    assert!(retain_value < forget, "{target_vs}");
    let bad = unlearn(&[
        "klom",
        "--oracle",
        &retain,
        "--unlearned",
        &target,
        "--data",
        "forget",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("SPLIT=PATH"));
}

#[test]
fn klom_rejects_absurd_bins_and_percentiles_before_scoring() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("data/models/target").display().to_string();
    let data = format!("forget={}", root.join("data/tofu/forget10.jsonl").display());
    for (flag, value, needle) in [
        ("--bins", "0", "--bins must be from 1 to 10000"),
        ("--bins", "4000000000", "--bins must be from 1 to 10000"),
        ("--percentile", "200", "--percentile must be in [0, 100]"),
    ] {
        let args = [
            "klom",
            flag,
            value,
            "--oracle",
            &model,
            "--unlearned",
            &model,
            "--data",
            &data,
        ];
        let o = unlearn(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{flag} {value}: {err}"
        );
    }
    // a member with another tokenizer would be scored on token ids that are not its own
    let other = root.join("tests/fixtures/hf/llama").display().to_string();
    let args = [
        "klom",
        "--oracle",
        &model,
        "--unlearned",
        &other,
        "--data",
        &data,
    ];
    let o = unlearn(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("must share one tokenizer") && err.contains(&other),
        "{err}"
    );
}

#[test]
fn compare_and_plot_on_odd_metrics_files() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let metrics = run.join("metrics.jsonl");
    let good = "{\"step\":0,\"eval\":{\"foo\":1.0}}\n{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"eval\":{\"foo\":2.0}}\n";
    std::fs::write(&metrics, good).unwrap();
    let dir = run.display().to_string();
    // none of the default keys: a well-formed three-column table
    let o = unlearn(&["compare", &dir]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], "| run | method | steps |");
    assert_eq!(lines[1], "| --- | --- | --- |");
    let o = unlearn(&["compare", &dir, "--keys", "foo"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("1.0000 → 2.0000"));
    let o = unlearn(&["compare", &dir, "--keys", "fo"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("'fo' is in no run's evaluations (they have: foo)"),
        "{err}"
    );
    // a damaged line in the middle is an error; a cut last line only a note
    std::fs::write(
        &metrics,
        good.replace("{\"step\":1,\"loss\":0.5}", "{\"step\":1,\"lo"),
    )
    .unwrap();
    let o = unlearn(&["compare", &dir, "--keys", "foo"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("line 2"), "{err}");
    std::fs::write(&metrics, format!("{good}{{\"step\":3,\"lo")).unwrap();
    let o = unlearn(&["compare", &dir, "--keys", "foo"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cut off"));
    // nothing to plot: an error, and no empty plots/ left behind
    std::fs::write(&metrics, "").unwrap();
    let o = unlearn(&["plot", &dir]);
    assert!(!o.status.success());
    assert!(!run.join("plots").exists());
}

#[test]
fn outputs_in_places_that_cannot_take_them_are_named() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let model = root.join("tests/fixtures/hf/llama").display().to_string();
    let adapter = root
        .join("tests/fixtures/hf/llama-lora")
        .display()
        .to_string();
    let data = root.join("tests/fixtures/unlearn/forget.jsonl");
    // the file asked for, not the temporary name it is first written under
    let out = tmp.path().join("no-such-dir/scores.jsonl");
    let o = unlearn(&[
        "score",
        "--model",
        &model,
        "--data",
        &data.display().to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(&format!("{}:", out.display())) && !err.contains("scores.jsonl.tmp"),
        "{err}"
    );
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let o = unlearn(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--out",
        &file.display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is a file"), "{err}");
}

#[test]
fn a_config_that_leaves_weights_unused_is_reported() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("llama");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(root.join("tests/fixtures/hf/llama")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let dir = model.display().to_string();
    let o = unlearn(&["inspect", &dir]);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("not used"));
    // two layers stored, one configured: a smaller model, said out loud
    let cfg_path = model.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_hidden_layers"] = 1.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let o = unlearn(&["inspect", &dir]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tensor(s) are not used") && err.contains("model.layers.1."),
        "{err}"
    );
}

#[test]
fn resuming_past_a_damaged_checkpoint_says_so() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let recipe = root.join("recipes/demo.toml").display().to_string();
    let sets = [
        "--set".to_string(),
        format!("output.dir=\"{}\"", out.display()),
        "--set".into(),
        "train.steps=2".into(),
        "--set".into(),
        "train.checkpoint_every=1".into(),
        "--set".into(),
        "eval.every=0".into(),
    ];
    let mut args = vec!["run", &recipe];
    args.extend(sets.iter().map(String::as_str));
    let o = unlearn(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(out.join("checkpoints/step-000002/state.json")).unwrap();
    let out_s = out.display().to_string();
    args.extend(["--resume", &out_s]);
    let o = unlearn(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("step-000002 has no state.json") && err.contains("step-000001"),
        "{err}"
    );
}
