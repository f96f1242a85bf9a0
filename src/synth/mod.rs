//! A bundled, entirely fictional unlearning benchmark, generated deterministically, and a
//! byte-level BPE tokenizer trainer for it.
//!
//! * `tofu/`: a TOFU-style question-answering set about 220 invented people (forget10 /
//!   retain90 / holdout splits, paraphrased and perturbed answers) plus a small control set of
//!   real general-knowledge facts. See [`tofu`].
//! * `wmdp/`: a WMDP-style task in an invented technical domain ("aetheric lattice
//!   engineering"): a "hazardous" subdomain to forget and a benign neighbouring one to keep,
//!   each with a text corpus and cloze-style multiple-choice questions. See [`wmdp`].
//!
//! Every byte of the output is a function of the code alone: all randomness comes from
//! [`crate::rng::Rng`] seeded with [`SEED`], no hash-map iteration order is observed, no floats
//! are formatted, and JSONL is written one object per line with keys in a fixed order.
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::weights::write_atomic;
use crate::rng::Rng;

pub mod tofu;
pub mod tokenizer;
pub mod wmdp;

pub use tokenizer::train_tokenizer;

/// The fixed seed every generator stream is forked from.
pub const SEED: u64 = 0x05EE_D0F7_AB1E;

/// Write the whole benchmark under `out` (creating `out/tofu/` and `out/wmdp/`); returns the
/// written paths, sorted.
pub fn write_benchmark(out: &Path) -> Result<Vec<PathBuf>> {
    let root = Rng::new(SEED);
    let mut written = Vec::new();
    written.extend(tofu::write(&out.join("tofu"), &root.fork("tofu"))?);
    written.extend(wmdp::write(&out.join("wmdp"), &root.fork("wmdp"))?);
    written.sort();
    Ok(written)
}

/// Serialize `rows` as JSONL (one compact object per line, each ending in "\n").
pub(crate) fn to_jsonl<T: Serialize>(rows: &[T]) -> String {
    let mut s = String::new();
    for row in rows {
        // Serializing plain structs of strings and integers cannot fail.
        s.push_str(&serde_json::to_string(row).expect("serializable row"));
        s.push('\n');
    }
    s
}

/// Create `dir` (and parents).
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Atomically write `text` to `dir/name`, recording the path in `written`.
pub(crate) fn write_text(
    dir: &Path,
    name: &str,
    text: &str,
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    let path = dir.join(name);
    write_atomic(&path, text.as_bytes())?;
    written.push(path);
    Ok(())
}

/// A uniformly chosen element.
pub(crate) fn pick<'a, T: ?Sized>(rng: &mut Rng, pool: &[&'a T]) -> &'a T {
    pool[rng.below(pool.len())]
}

/// `n` distinct indices in `0..len`, excluding `exclude`, in random order.
pub(crate) fn distinct_indices(
    rng: &mut Rng,
    len: usize,
    n: usize,
    exclude: Option<usize>,
) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..len).filter(|&i| Some(i) != exclude).collect();
    assert!(idx.len() >= n, "pool of {len} too small for {n} draws");
    rng.shuffle(&mut idx);
    idx.truncate(n);
    idx
}

/// "a" or "an" for a noun phrase (by its first letter; the pools avoid the exceptions).
pub(crate) fn article(word: &str) -> &'static str {
    match word.chars().next().map(|c| c.to_ascii_lowercase()) {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

/// Replace each `{key}` in `template` by its value.
pub(crate) fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    debug_assert!(
        !out.contains('{'),
        "unfilled placeholder in {template:?} -> {out:?}"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(article("archivist"), "an");
        assert_eq!(article("baker"), "a");
        assert_eq!(
            fill("{name} is {a0}.", &[("name", "X"), ("a0", "a baker")]),
            "X is a baker."
        );
        let mut r = Rng::new(1);
        let v = distinct_indices(&mut r, 6, 5, Some(2));
        assert_eq!(v.len(), 5);
        assert!(!v.contains(&2));
        let mut s = v.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 5);
    }
}
