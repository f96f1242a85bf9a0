//! Bad inputs: every broken checkpoint or adapter must be rejected with an error (never a panic,
//! never a silent success) whose message names the offending file and the problem.
mod common;
use candle_core::DType;
use common::*;
use std::path::{Path, PathBuf};
use unlearn::lora::load_adapter;
use unlearn::merge::{merge, MergeOptions};
use unlearn::model::weights::{write_safetensors, OwnedView, SafetensorsFile};
use unlearn::model::Decoder;

const LORA: &str = "base_model.model.model.layers";

/// Copy every file of a fixture (except the reference outputs) into `dst`.
fn copy_fixture(name: &str, dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        let file_name = entry.file_name();
        if file_name == "reference.safetensors" {
            continue;
        }
        std::fs::copy(entry.path(), dst.join(&file_name)).unwrap();
    }
    dst.to_path_buf()
}

/// Rewrite a safetensors file, letting `edit` drop (return None), rename or reshape tensors.
fn rewrite_safetensors(path: &Path, edit: impl Fn(&str, OwnedView) -> Option<(String, OwnedView)>) {
    let tensors: Vec<(String, OwnedView)> = {
        let file = SafetensorsFile::open(path).unwrap();
        let mut names: Vec<String> = file.names().cloned().collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| {
                let info = file.info(&n).unwrap();
                let view = OwnedView {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    data: file.bytes(&n).unwrap().to_vec(),
                };
                edit(&n, view)
            })
            .collect()
    };
    write_safetensors(path, &tensors).unwrap();
}

/// Keep the first `rows` rows of a 2-D f32 tensor.
fn truncate_rows(v: OwnedView, rows: usize) -> OwnedView {
    let cols = v.shape[1];
    let elem = v.data.len() / (v.shape[0] * cols);
    OwnedView {
        dtype: v.dtype,
        shape: vec![rows, cols],
        data: v.data[..rows * cols * elem].to_vec(),
    }
}

/// Keep the first `cols` columns of a 2-D tensor.
fn truncate_cols(v: OwnedView, cols: usize) -> OwnedView {
    let (rows, old_cols) = (v.shape[0], v.shape[1]);
    let elem = v.data.len() / (rows * old_cols);
    let data = v
        .data
        .chunks_exact(old_cols * elem)
        .flat_map(|row| row[..cols * elem].to_vec())
        .collect();
    OwnedView {
        dtype: v.dtype,
        shape: vec![rows, cols],
        data,
    }
}

fn load_err(dir: &Path) -> String {
    match Decoder::load(dir, DType::F32, &cpu()) {
        Ok(_) => panic!(
            "Decoder::load accepted the broken checkpoint {}",
            dir.display()
        ),
        Err(e) => e.to_string(),
    }
}

fn adapter_err(base: &str, adapter: &Path) -> String {
    let mut model = Decoder::load(&fixture(base), DType::F32, &cpu()).unwrap();
    match load_adapter(&mut model, adapter) {
        Ok(cfg) => panic!(
            "load_adapter accepted the broken adapter {} ({cfg:?})",
            adapter.display()
        ),
        Err(e) => e.to_string(),
    }
}

fn merge_err(model_dir: &Path, adapter: &Path) -> String {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("merged");
    match merge(model_dir, adapter, &out_dir, &MergeOptions::default()) {
        Ok(r) => panic!(
            "merge accepted {} + {} ({r:?})",
            model_dir.display(),
            adapter.display()
        ),
        Err(e) => {
            assert!(
                !out_dir.exists(),
                "a failed merge must not leave {}",
                out_dir.display()
            );
            e.to_string()
        }
    }
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "error message lacks {n:?}: {msg}");
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------------------------
// sanity: the copies are good before they are broken

#[test]
fn valid_copies_load_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let base = copy_fixture("llama", &tmp.path().join("base"));
    let adapter = copy_fixture("llama-lora", &tmp.path().join("adapter"));
    let mut model = Decoder::load(&base, DType::F32, &cpu()).unwrap();
    let cfg = load_adapter(&mut model, &adapter).unwrap();
    assert_eq!(cfg.r, 4);
    assert_eq!(unlearn::lora::lora_vars(&model).len(), 28);
    // a rewritten (unchanged) adapter file is still valid: the rewriting helper is faithful
    rewrite_safetensors(&adapter.join("adapter_model.safetensors"), |n, v| {
        Some((n.to_string(), v))
    });
    rewrite_safetensors(&base.join("model.safetensors"), |n, v| {
        Some((n.to_string(), v))
    });
    let mut model = Decoder::load(&base, DType::F32, &cpu()).unwrap();
    load_adapter(&mut model, &adapter).unwrap();
    let report = merge(
        &base,
        &adapter,
        &tmp.path().join("merged"),
        &MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(report.merged_modules, 14);
    let sharded = copy_fixture("llama-sharded", &tmp.path().join("sharded"));
    Decoder::load(&sharded, DType::F32, &cpu()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// config.json

#[test]
fn missing_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama", tmp.path());
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let cfg = path_str(&dir.join("config.json"));
    assert_mentions(&load_err(&dir), &[&cfg, "missing"]);
    assert_mentions(&merge_err(&dir, &fixture("llama-lora")), &[&cfg, "missing"]);
}

#[test]
fn config_json_not_valid_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama", tmp.path());
    std::fs::write(
        dir.join("config.json"),
        "{\"model_type\": \"llama\", \"hidden_size\": ",
    )
    .unwrap();
    let cfg = path_str(&dir.join("config.json"));
    assert_mentions(&load_err(&dir), &[&cfg, "invalid JSON"]);
    assert_mentions(
        &merge_err(&dir, &fixture("llama-lora")),
        &[&cfg, "invalid JSON"],
    );
}

#[test]
fn config_json_unknown_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama", tmp.path());
    edit_json(&dir.join("config.json"), |m| {
        m.insert("model_type".into(), "foo".into());
    });
    let cfg = path_str(&dir.join("config.json"));
    let needles = [
        cfg.as_str(),
        "unknown model_type 'foo'",
        "supported",
        "llama",
        "qwen2",
        "gpt2",
    ];
    assert_mentions(&load_err(&dir), &needles);
    assert_mentions(&merge_err(&dir, &fixture("llama-lora")), &needles);
}

#[test]
fn config_json_missing_required_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama", tmp.path());
    edit_json(&dir.join("config.json"), |m| {
        m.remove("hidden_size");
    });
    let cfg = path_str(&dir.join("config.json"));
    let needles = [cfg.as_str(), "missing required key", "hidden_size"];
    assert_mentions(&load_err(&dir), &needles);
    assert_mentions(&merge_err(&dir, &fixture("llama-lora")), &needles);
}

// ---------------------------------------------------------------------------------------------
// weights

#[test]
fn weight_missing_from_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama", tmp.path());
    let st = dir.join("model.safetensors");
    let gone = "model.layers.1.mlp.down_proj.weight";
    rewrite_safetensors(&st, |n, v| (n != gone).then(|| (n.to_string(), v)));
    assert_mentions(&load_err(&dir), &[&path_str(&st), gone, "missing"]);
    // merge checks the base against its config before touching the adapter
    assert_mentions(
        &merge_err(&dir, &fixture("llama-lora")),
        &[&path_str(&st), gone, "missing"],
    );
}

#[test]
fn weight_with_wrong_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama", tmp.path());
    let st = dir.join("model.safetensors");
    let bad = "model.layers.0.self_attn.q_proj.weight";
    rewrite_safetensors(&st, |n, v| {
        Some((
            n.to_string(),
            if n == bad { truncate_rows(v, 32) } else { v },
        ))
    });
    assert_mentions(
        &load_err(&dir),
        &[&path_str(&st), bad, "[32, 64]", "[64, 64]", "expected"],
    );
    assert_mentions(
        &merge_err(&dir, &fixture("llama-lora")),
        &[
            &path_str(&st),
            "model.layers.0.self_attn.q_proj",
            "[32, 64]",
        ],
    );
}

/// A NaN or infinite base weight is an error at load naming the weight, the file and the
/// element, not a NaN score later; merging it too. f32 (NaN) and bf16 (+inf) checkpoints.
#[test]
fn weight_holding_nan_or_infinity() {
    for (fixture_name, elem, bad) in [
        ("llama", 4, f32::NAN.to_le_bytes().to_vec()),
        ("llama-bf16", 2, half::bf16::INFINITY.to_le_bytes().to_vec()),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = copy_fixture(fixture_name, tmp.path());
        let st = dir.join("model.safetensors");
        let poisoned = "model.layers.1.self_attn.v_proj.weight";
        rewrite_safetensors(&st, |n, mut v| {
            if n == poisoned {
                // element 37
                v.data[37 * elem..38 * elem].copy_from_slice(&bad);
            }
            Some((n.to_string(), v))
        });
        let needles = [
            path_str(&st),
            poisoned.to_string(),
            "NaN or infinite".into(),
            "element 37".into(),
        ];
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        assert_mentions(&load_err(&dir), &needles);
        assert_mentions(&merge_err(&dir, &fixture("llama-lora")), &needles);
    }
}

#[test]
fn merge_rejects_a_base_that_contradicts_its_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama", tmp.path());
    edit_json(&dir.join("config.json"), |m| {
        m.insert("vocab_size".into(), serde_json::json!(999));
    });
    assert_mentions(
        &merge_err(&dir, &fixture("llama-lora")),
        &["model.embed_tokens.weight", "[999, 64]", "[320, 64]"],
    );
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama", tmp.path());
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let needles = [path_str(&st), "truncated".to_string()];
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    assert_mentions(&load_err(&dir), &needles);
    assert_mentions(&merge_err(&dir, &fixture("llama-lora")), &needles);
}

#[test]
fn garbage_safetensors_header() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama", tmp.path());
    let st = dir.join("model.safetensors");
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&st, garbage).unwrap();
    let needles = [path_str(&st), "not a valid safetensors file".to_string()];
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    assert_mentions(&load_err(&dir), &needles);
    assert_mentions(&merge_err(&dir, &fixture("llama-lora")), &needles);

    // a plausible header length followed by bytes that are not JSON
    let mut bad = 64u64.to_le_bytes().to_vec();
    bad.extend(std::iter::repeat_n(0xffu8, 256));
    std::fs::write(&st, bad).unwrap();
    assert_mentions(&load_err(&dir), &needles);
}

#[test]
fn sharded_checkpoint_with_missing_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama-sharded", tmp.path());
    let shard = "model-00007-of-00012.safetensors";
    std::fs::remove_file(dir.join(shard)).unwrap();
    let index = path_str(&dir.join("model.safetensors.index.json"));
    let needles = [index.as_str(), shard, "does not exist"];
    assert_mentions(&load_err(&dir), &needles);
    assert_mentions(&merge_err(&dir, &fixture("llama-lora")), &needles);
}

#[test]
fn no_safetensors_at_all() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("only-config");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixture("llama").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let d = path_str(&dir);
    let needles = [d.as_str(), "model.safetensors", "no "];
    assert_mentions(&load_err(&dir), &needles);
    assert_mentions(&merge_err(&dir, &fixture("llama-lora")), &needles);
}

// ---------------------------------------------------------------------------------------------
// adapters

#[test]
fn adapter_shapes_do_not_fit_base() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    let st = adapter.join("adapter_model.safetensors");
    let bad = format!("{LORA}.0.self_attn.q_proj.lora_A.weight");
    rewrite_safetensors(&st, |n, v| {
        Some((
            n.to_string(),
            if n == bad { truncate_cols(v, 32) } else { v },
        ))
    });
    let st_s = path_str(&st);
    let needles = [st_s.as_str(), "model.layers.0.self_attn.q_proj", "[4, 32]"];
    assert_mentions(&adapter_err("llama", &adapter), &needles);
    assert_mentions(&merge_err(&fixture("llama"), &adapter), &needles);
}

#[test]
fn adapter_rank_mismatch_between_a_and_b() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    let st = adapter.join("adapter_model.safetensors");
    let bad = format!("{LORA}.1.mlp.up_proj.lora_A.weight");
    rewrite_safetensors(&st, |n, v| {
        Some((
            n.to_string(),
            if n == bad { truncate_rows(v, 2) } else { v },
        ))
    });
    let st_s = path_str(&st);
    let needles = [st_s.as_str(), "model.layers.1.mlp.up_proj", "[2, 64]"];
    assert_mentions(&adapter_err("llama", &adapter), &needles);
    assert_mentions(&merge_err(&fixture("llama"), &adapter), &needles);
}

#[test]
fn adapter_targets_module_the_base_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    let st = adapter.join("adapter_model.safetensors");
    rewrite_safetensors(&st, |n, v| {
        let renamed = n.replace(
            "model.layers.0.self_attn.q_proj.",
            "model.layers.5.self_attn.q_proj.",
        );
        Some((renamed, v))
    });
    let st_s = path_str(&st);
    let needles = [st_s.as_str(), "model.layers.5.self_attn.q_proj"];
    assert_mentions(&adapter_err("llama", &adapter), &needles);
    assert_mentions(&merge_err(&fixture("llama"), &adapter), &needles);
}

#[test]
fn adapter_with_only_lora_a_for_a_module() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    let st = adapter.join("adapter_model.safetensors");
    let dropped = format!("{LORA}.1.self_attn.v_proj.lora_B.weight");
    rewrite_safetensors(&st, |n, v| (n != dropped).then(|| (n.to_string(), v)));
    let st_s = path_str(&st);
    let needles = [
        st_s.as_str(),
        "model.layers.1.self_attn.v_proj",
        "only one of lora_A / lora_B",
    ];
    assert_mentions(&adapter_err("llama", &adapter), &needles);
    assert_mentions(&merge_err(&fixture("llama"), &adapter), &needles);
}

#[test]
fn adapter_without_adapter_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    std::fs::remove_file(adapter.join("adapter_config.json")).unwrap();
    let cfg = path_str(&adapter.join("adapter_config.json"));
    let needles = [cfg.as_str(), "missing"];
    assert_mentions(&adapter_err("llama", &adapter), &needles);
    assert_mentions(&merge_err(&fixture("llama"), &adapter), &needles);
}

#[test]
fn adapter_without_adapter_model_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    std::fs::remove_file(adapter.join("adapter_model.safetensors")).unwrap();
    let st = path_str(&adapter.join("adapter_model.safetensors"));
    let needles = [st.as_str(), "missing"];
    assert_mentions(&adapter_err("llama", &adapter), &needles);
    assert_mentions(&merge_err(&fixture("llama"), &adapter), &needles);
}

#[test]
fn adapter_with_dora() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    edit_json(&adapter.join("adapter_config.json"), |m| {
        m.insert("use_dora".into(), true.into());
    });
    let cfg = path_str(&adapter.join("adapter_config.json"));
    let needles = [cfg.as_str(), "DoRA", "use_dora", "not supported"];
    assert_mentions(&adapter_err("llama", &adapter), &needles);
    assert_mentions(&merge_err(&fixture("llama"), &adapter), &needles);
}

#[test]
fn adapter_with_prefix_tuning_peft_type() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    edit_json(&adapter.join("adapter_config.json"), |m| {
        m.insert("peft_type".into(), "PREFIX_TUNING".into());
    });
    let cfg = path_str(&adapter.join("adapter_config.json"));
    let needles = [cfg.as_str(), "PREFIX_TUNING", "not supported"];
    assert_mentions(&adapter_err("llama", &adapter), &needles);
    assert_mentions(&merge_err(&fixture("llama"), &adapter), &needles);
}

#[test]
fn llama_adapter_on_gpt2_base() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    let st = path_str(&adapter.join("adapter_model.safetensors"));
    let needles = [st.as_str(), "model.layers.", "does not have"];
    assert_mentions(&adapter_err("gpt2", &adapter), &needles);
    assert_mentions(&merge_err(&fixture("gpt2"), &adapter), &needles);
}

#[test]
fn adapter_config_fields_of_the_wrong_type_are_errors_not_defaults() {
    // "lora_alpha": "16" read as PEFT's default 8 would halve the adapter without a word
    let cases: [(&str, serde_json::Value); 8] = [
        ("lora_alpha", "16".into()),
        ("lora_dropout", "0.1".into()),
        ("use_rslora", "yes".into()),
        ("use_dora", 1.into()),
        ("peft_type", 5.into()),
        ("bias", 5.into()),
        ("target_modules", serde_json::json!(["q_proj", 1])),
        ("layers_to_transform", serde_json::json!(["0"])),
    ];
    for (key, value) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let adapter = copy_fixture("llama-lora", tmp.path());
        edit_json(&adapter.join("adapter_config.json"), |m| {
            m.insert(key.into(), value.clone());
        });
        let cfg = path_str(&adapter.join("adapter_config.json"));
        let msg = adapter_err("llama", &adapter);
        assert_mentions(&msg, &[cfg.as_str(), &format!("'{key}' must be")]);
    }
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    edit_json(&adapter.join("adapter_config.json"), |m| {
        m.remove("peft_type");
    });
    assert_mentions(&adapter_err("llama", &adapter), &["missing 'peft_type'"]);
}

#[test]
fn adapter_whose_tensors_contradict_its_config() {
    // r = 8 in the config, rank-4 tensors: PEFT refuses to load it, and alpha / r would be off
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    edit_json(&adapter.join("adapter_config.json"), |m| {
        m.insert("r".into(), 8.into());
    });
    let st = path_str(&adapter.join("adapter_model.safetensors"));
    let needles = [st.as_str(), "has rank 4", "r = 8"];
    assert_mentions(&adapter_err("llama", &adapter), &needles);
    assert_mentions(&merge_err(&fixture("llama"), &adapter), &needles);

    // weights in layer 1 that layers_to_transform = [0] leaves out
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    edit_json(&adapter.join("adapter_config.json"), |m| {
        m.insert("layers_to_transform".into(), serde_json::json!([0]));
    });
    let needles = [st.as_str(), "in layer 1", "layers_to_transform [0]"];
    let needles = [
        path_str(&adapter.join("adapter_model.safetensors")),
        needles[1].into(),
        needles[2].into(),
    ];
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    assert_mentions(&adapter_err("llama", &adapter), &needles);
}

#[test]
fn adapter_with_nan_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = copy_fixture("llama-lora", tmp.path());
    let st = adapter.join("adapter_model.safetensors");
    let poisoned = format!("{LORA}.0.self_attn.k_proj.lora_B.weight");
    rewrite_safetensors(&st, |n, mut v| {
        if n == poisoned {
            // one element of an f32 tensor
            v.data[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        Some((n.to_string(), v))
    });
    let st_s = path_str(&st);
    let needles = [st_s.as_str(), "model.layers.0.self_attn.k_proj", "NaN"];
    assert_mentions(&adapter_err("llama", &adapter), &needles);
    assert_mentions(&merge_err(&fixture("llama"), &adapter), &needles);
}
