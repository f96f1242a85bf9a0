//! The bundled offline default: the committed benchmark and tokenizer are exactly what the
//! generator produces, and the committed models are what the README says they are.
mod common;

use std::path::{Path, PathBuf};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn same_bytes(generated: &Path, committed: &Path) {
    let a = std::fs::read(generated).unwrap();
    let b = std::fs::read(committed).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run `unlearn synth --out data`)",
            committed.display()
        )
    });
    assert!(
        a == b,
        "{} differs from the generator's output; regenerate with `unlearn synth --out data`",
        committed.display()
    );
}

#[test]
fn committed_benchmark_and_tokenizer_equal_a_fresh_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let written = unlearn::synth::write_benchmark(tmp.path()).unwrap();
    assert!(written.len() >= 10);
    for path in &written {
        let rel = path.strip_prefix(tmp.path()).unwrap();
        same_bytes(path, &repo("data").join(rel));
    }
    // no stale file in data/tofu or data/wmdp that the generator no longer writes
    for sub in ["tofu", "wmdp"] {
        for entry in std::fs::read_dir(repo("data").join(sub)).unwrap() {
            let p = entry.unwrap().path();
            let rel = p.strip_prefix(repo("data")).unwrap();
            assert!(
                tmp.path().join(rel).exists(),
                "{} is not produced by the generator",
                p.display()
            );
        }
    }
    // the tokenizer is trained as `unlearn synth` trains it: on every JSONL file, vocab 2048
    let corpus: Vec<PathBuf> = written
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .cloned()
        .collect();
    let tok_dir = tmp.path().join("tokenizer");
    unlearn::synth::train_tokenizer(&corpus, 2048, &tok_dir).unwrap();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        same_bytes(&tok_dir.join(name), &repo("data/tokenizer").join(name));
    }
}
