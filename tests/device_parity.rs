//! `unlearn parity` (device check): logits, loss and LoRA gradients of a device/dtype against the CPU in f32
//! and transformers + PEFT. Here the device is the CPU (CI has no GPU); bf16 base weights on the
//! CPU exercise the bf16 tolerance that a CUDA run is held to.
mod common;
use candle_core::{DType, Device};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use unlearn::model::weights::{write_safetensors, OwnedView};
use unlearn::parity::{check, relative_l2, ParityRequest};

fn request(base: &str, dtype: DType) -> ParityRequest {
    let adapter = fixture(&format!("{base}-lora"));
    ParityRequest {
        model: fixture(base),
        reference: adapter.join("reference.safetensors"),
        adapter,
        device: Device::Cpu,
        dtype,
    }
}

#[test]
fn f32_matches_peft_and_bf16_stays_within_its_tolerance() {
    for base in ["llama", "qwen2"] {
        let f32_report = check(&request(base, DType::F32)).unwrap();
        // logits, loss, 2 layers × 7 modules × (A, B)
        assert_eq!(f32_report.tensors.len(), 30, "{base}");
        assert_eq!(f32_report.tensors[0].name, "logits");
        for t in &f32_report.tensors {
            assert_eq!(t.vs_cpu, 0.0, "{base} {}: same computation", t.name);
            let r = t.vs_reference.expect("every tensor has a PEFT reference");
            assert!(r <= 1e-5, "{base} {}: {r} from PEFT", t.name);
        }
        assert!(f32_report.pass);
        assert_eq!(f32_report.optimizer_step_mismatches, 0);

        // bf16 base weights: really rounded (not zero error), within twice PyTorch's own bf16
        // error on these fixtures (2.4e-2 worst gradient)
        let bf16 = check(&request(base, DType::BF16)).unwrap();
        assert!(
            bf16.pass,
            "{base}: worst {} at {}",
            bf16.worst, bf16.worst_name
        );
        assert!(
            bf16.worst > 1e-3 && bf16.worst <= 5e-2,
            "{base}: {}",
            bf16.worst
        );
        assert_eq!(bf16.tolerance, 5e-2);
        let logits = &bf16.tensors[0];
        assert!(
            logits.vs_cpu > 1e-3 && logits.vs_cpu < 3e-2,
            "{}",
            logits.vs_cpu
        );
        // against f32 CPU and against PEFT alike, as the two agree to 1e-5
        let r = logits.vs_reference.unwrap();
        assert!((r - logits.vs_cpu).abs() < 1e-4, "{r} vs {}", logits.vs_cpu);
    }
}

#[test]
fn relative_l2_is_the_normalised_distance() {
    let a = candle_core::Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
    let b = candle_core::Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap();
    // ‖(0, 4)‖ / ‖(3, 0)‖
    assert!((relative_l2(&a, &b).unwrap() - 4.0 / 3.0).abs() < 1e-12);
    let zero = candle_core::Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(relative_l2(&zero, &zero).unwrap(), 0.0);
    assert!(relative_l2(
        &a,
        &candle_core::Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()
    )
    .is_err());
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_unlearn"))
        .args(args)
        .output()
        .expect("run unlearn")
}

/// The reference with `edit` applied to its tensors, written to `dir/reference.safetensors`.
fn edited_reference(
    dir: &Path,
    edit: impl Fn(&str, candle_core::Tensor) -> Option<candle_core::Tensor>,
) -> PathBuf {
    let tensors: Vec<(String, OwnedView)> = reference("llama-lora")
        .into_iter()
        .filter_map(|(n, t)| edit(&n, t).map(|t| (n, OwnedView::from_tensor(&t).unwrap())))
        .collect();
    let path = dir.join("reference.safetensors");
    write_safetensors(&path, &tensors).unwrap();
    path
}

#[test]
fn cli_passes_on_agreement_and_fails_with_the_tensor_named() {
    // `global` flags go before the subcommand, `json` after it
    let parity = |reference: &Path, global: &[&str], json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_unlearn"));
        cmd.args(global)
            .arg("parity")
            .args(if json { &["--json"][..] } else { &[] })
            .arg("--model")
            .arg(fixture("llama"))
            .arg("--adapter")
            .arg(fixture("llama-lora"))
            .arg("--reference")
            .arg(reference);
        let out = cmd.output().expect("run unlearn");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out, err)
    };
    let good = fixture("llama-lora").join("reference.safetensors");
    for (dtype, flags) in [("f32", vec![]), ("bf16", vec!["--base-dtype", "bf16"])] {
        let (out, err) = parity(&good, &flags, true);
        assert!(out.status.success(), "{err}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["dtype"], dtype);
        assert_eq!(report["pass"], true);
        assert_eq!(report["optimizer_step_mismatches"], 0);
    }

    // PEFT's gradient of one LoRA B scaled by 1.1: ‖g − 1.1g‖ / ‖1.1g‖ = 0.1 / 1.1 there
    let tmp = tempfile::tempdir().unwrap();
    let wrong = "grad.base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight";
    let bad = edited_reference(tmp.path(), |n, t| {
        Some(if n == wrong { (t * 1.1).unwrap() } else { t })
    });
    let (out, err) = parity(&bad, &[], false);
    assert!(!out.status.success());
    assert!(
        err.contains("layers.1.mlp.up_proj.lora_B") && err.contains("9.09e-2"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"));

    // a reference gradient the adapter has no weight for: not the adapter it was made with
    let tmp3 = tempfile::tempdir().unwrap();
    let extra = tmp3.path().join("reference.safetensors");
    let mut tensors: Vec<(String, OwnedView)> = reference("llama-lora")
        .into_iter()
        .map(|(n, t)| (n, OwnedView::from_tensor(&t).unwrap()))
        .collect();
    let stray = "grad.base_model.model.model.embed_tokens.lora_embedding_A.default";
    let g = candle_core::Tensor::zeros((4, 320), DType::F32, &Device::Cpu).unwrap();
    tensors.push((stray.into(), OwnedView::from_tensor(&g).unwrap()));
    write_safetensors(&extra, &tensors).unwrap();
    let (out, err) = parity(&extra, &[], false);
    assert!(!out.status.success());
    assert!(
        err.contains("match no LoRA weight") && err.contains(stray),
        "{err}"
    );

    // a reference without the batch is refused, naming the file and the missing tensor
    let tmp2 = tempfile::tempdir().unwrap();
    let no_ids = edited_reference(tmp2.path(), |n, t| (n != "input_ids").then_some(t));
    let (out, err) = parity(&no_ids, &[], false);
    assert!(!out.status.success());
    assert!(
        err.contains("reference.safetensors") && err.contains("input_ids"),
        "{err}"
    );

    // …and one whose labels take no loss anywhere
    let tmp3 = tempfile::tempdir().unwrap();
    let no_labels = edited_reference(tmp3.path(), |n, t| {
        Some(if n == "labels" {
            (t.ones_like().unwrap() * -100.0).unwrap()
        } else {
            t
        })
    });
    let (out, err) = parity(&no_labels, &[], false);
    assert!(!out.status.success());
    assert!(
        err.contains("reference.safetensors") && err.contains("-100 at every position"),
        "{err}"
    );
}

/// The per-step losses of a 6-step `method` run with the base weights in `dtype`, and its
/// directory.
fn run_losses(dtype: &str, method: &str, params: &str) -> (Vec<f64>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let recipe = write_recipe(tmp, method, params, "steps = 6\ncheckpoint_every = 0");
    let out = run(&["--base-dtype", dtype, "run", recipe.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{dtype}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = std::fs::read_to_string(tmp.join("out/metrics.jsonl")).unwrap();
    let losses = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(serde_json::Value::as_f64))
        .collect();
    (losses, dir)
}

/// Each step's loss within `rel` of the f32 run's (bf16 noise), all finite.
fn assert_close(f32_losses: &[f64], bf16_losses: &[f64], rel: f64) {
    assert_eq!(f32_losses.len(), bf16_losses.len());
    for (a, b) in f32_losses.iter().zip(bf16_losses) {
        assert!(
            b.is_finite() && (a - b).abs() <= rel * a.abs().max(0.1),
            "{f32_losses:?} vs {bf16_losses:?}"
        );
    }
}

/// A whole unlearning run with bf16 base weights (`--base-dtype bf16`, the CUDA default) on the
/// CPU: bf16 matmuls and the composed RMSNorm and RoPE a GPU runs, end to end. It follows the
/// f32 run within bf16 noise, and the adapter it writes stays f32.
#[test]
fn bf16_base_weights_train_like_f32_and_keep_the_adapter_f32() {
    let (f32_losses, _) = run_losses("f32", "npo", "");
    let (bf16_losses, bf16_dir) = run_losses("bf16", "npo", "");
    let adapter = bf16_dir
        .path()
        .join("out/adapter/adapter_model.safetensors");
    assert_eq!(f32_losses.len(), 6);
    assert_close(&f32_losses, &bf16_losses, 0.01);
    // training moved the loss, in both
    assert!(
        (f32_losses[5] - f32_losses[0]).abs() > 0.01,
        "{f32_losses:?}"
    );
    let file = unlearn::model::weights::SafetensorsFile::open(&adapter).unwrap();
    let names: Vec<String> = file.names().cloned().collect();
    assert!(!names.is_empty());
    for n in names {
        assert_eq!(file.info(&n).unwrap().dtype, safetensors::Dtype::F32, "{n}");
    }
    // an unknown dtype is refused before anything runs
    let out = run(&["--base-dtype", "f64", "methods"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--base-dtype"));
}

/// DMM towards an oracle model directory: the teacher loads in the student's base dtype (bf16
/// here, as on a GPU), and the matching loss still follows the f32 run.
#[test]
fn dmm_teacher_follows_the_base_dtype() {
    let params = format!(
        "target = \"oracle:{}\"\nloss = \"kl\"\nforget_share = 0.5",
        fixture("llama-lora-merged").display()
    );
    let (f32_losses, _) = run_losses("f32", "dmm", &params);
    let (bf16_losses, _) = run_losses("bf16", "dmm", &params);
    assert_eq!(f32_losses.len(), 6);
    assert!(f32_losses[0] > 1e-3, "the teacher differs: {f32_losses:?}");
    assert_close(&f32_losses, &bf16_losses, 0.02);
}
