//! ROUGE-1 and ROUGE-L exactly as
//! `rouge_score.rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
//! .score(target, prediction)`.
use super::porter::porter_stem;
use std::collections::HashMap;

/// Precision, recall and F1 of one ROUGE type.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RougeScore {
    /// overlap / number of prediction tokens
    pub precision: f64,
    /// overlap / number of target (reference) tokens
    pub recall: f64,
    /// 2PR/(P+R), 0 when P + R = 0
    pub fmeasure: f64,
}

/// ROUGE-1 and ROUGE-L of one (target, prediction) pair.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RougeScores {
    pub rouge1: RougeScore,
    pub rouge_l: RougeScore,
}

/// rouge_score's tokeniser with `use_stemmer=True`:
/// lower-case (Unicode rules, as Python's `str.lower`); replace every run of characters outside
/// `[a-z0-9]` by a space (so non-ASCII letters are separators); split on whitespace; stem the
/// tokens **longer than 3 characters** with NLTK's Porter stemmer ([`porter_stem`]); drop empty
/// tokens.
pub fn rouge_tokenize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    lower
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(|t| {
            if t.len() > 3 {
                porter_stem(t)
            } else {
                t.to_string()
            }
        })
        .filter(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        .collect()
}

fn fmeasure(p: f64, r: f64) -> f64 {
    if p + r > 0.0 {
        2.0 * p * r / (p + r)
    } else {
        0.0
    }
}

/// Length of the longest common subsequence of two token sequences (O(|a|·|b|) time, O(|b|)
/// memory).
pub(crate) fn lcs_len(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-1 and ROUGE-L (`RougeScorer(['rouge1','rougeL'], use_stemmer=True).score(target,
/// prediction)`), tokenised by [`rouge_tokenize`].
///
/// * ROUGE-1: overlap = Σ over target unigrams of min(count in target, count in prediction);
///   precision = overlap / max(|prediction|, 1), recall = overlap / max(|target|, 1).
/// * ROUGE-L: L = LCS length; precision = L/|prediction|, recall = L/|target|; all three are 0
///   if either side has no token.
/// * F1 = 2PR/(P+R), 0 when P + R = 0.
///
/// TOFU reports ROUGE-L **recall**, MUSE ROUGE-L **F1**.
pub fn rouge(target: &str, prediction: &str) -> RougeScores {
    let t = rouge_tokenize(target);
    let p = rouge_tokenize(prediction);
    // rouge1
    let mut tc: HashMap<&str, usize> = HashMap::new();
    for w in &t {
        *tc.entry(w.as_str()).or_default() += 1;
    }
    let mut pc: HashMap<&str, usize> = HashMap::new();
    for w in &p {
        *pc.entry(w.as_str()).or_default() += 1;
    }
    let overlap: usize = tc
        .iter()
        .map(|(w, &c)| c.min(pc.get(w).copied().unwrap_or(0)))
        .sum();
    let p1 = overlap as f64 / p.len().max(1) as f64;
    let r1 = overlap as f64 / t.len().max(1) as f64;
    let rouge1 = RougeScore {
        precision: p1,
        recall: r1,
        fmeasure: fmeasure(p1, r1),
    };
    let rouge_l = if t.is_empty() || p.is_empty() {
        RougeScore::default()
    } else {
        let l = lcs_len(&t, &p) as f64;
        let pl = l / p.len() as f64;
        let rl = l / t.len() as f64;
        RougeScore {
            precision: pl,
            recall: rl,
            fmeasure: fmeasure(pl, rl),
        }
    };
    RougeScores { rouge1, rouge_l }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenise_and_lcs_by_hand() {
        // "Cats, sat!" → ["cat", "sat"]; "the cat sat" → ["the", "cat", "sat"]
        assert_eq!(rouge_tokenize("Cats, sat!"), ["cat", "sat"]);
        let s = rouge("the cat sat", "Cats, sat!");
        // overlap 2 of 2 prediction and 3 target tokens: P = 1, R = 2/3, F = 0.8
        assert_eq!(s.rouge1.precision, 1.0);
        assert!((s.rouge1.recall - 2.0 / 3.0).abs() < 1e-15);
        assert!((s.rouge1.fmeasure - 0.8).abs() < 1e-15);
        assert_eq!(s.rouge_l, s.rouge1);
        // LCS of [a b c d] and [b a d c] is 2
        let v = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(lcs_len(&v("a b c d"), &v("b a d c")), 2);
    }
}
