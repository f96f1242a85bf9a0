//! NLTK's `PorterStemmer()` in its default `NLTK_EXTENSIONS` mode (nltk 3.x), the stemmer
//! `rouge_score` uses with `use_stemmer=True`. Not Snowball/Porter2.
//!
//! The port works on bytes and is exact for ASCII words (rouge_score only stems tokens made of
//! `[a-z0-9]`); other input is lower-cased with Unicode rules and returned unchanged if it is
//! not ASCII.

/// Stem one word as `nltk.stem.porter.PorterStemmer().stem(word)` (which lower-cases first).
///
/// NLTK_EXTENSIONS specifics reproduced here: the irregular-forms pool (`skies → sky`,
/// `dying → die`, `news → news`, …), words of length <= 2 returned as is, `ies → ie` for
/// 4-letter words in step 1a, the `ied` rule in step 1b, step 1c's `(*c and not c) Y → I`,
/// step 2's `alli` pre-rule, `bli → ble`, `fulli → ful`, and `logi → log` with the measure
/// taken on the stem plus `l`, and the two-letter `*o` (vowel–consonant) case.
pub fn porter_stem(word: &str) -> String {
    let lower = word.to_lowercase();
    if let Some(s) = irregular(&lower) {
        return s.to_string();
    }
    if word.chars().count() <= 2 || !lower.is_ascii() {
        return lower;
    }
    let mut w = lower.into_bytes();
    w = step1a(w);
    w = step1b(w);
    w = step1c(w);
    w = step2(w);
    w = step3(w);
    w = step4(w);
    w = step5a(w);
    w = step5b(w);
    // only ASCII bytes were ever written
    String::from_utf8(w).unwrap_or_default()
}

fn irregular(w: &str) -> Option<&'static str> {
    Some(match w {
        "sky" | "skies" => "sky",
        "dying" => "die",
        "lying" => "lie",
        "tying" => "tie",
        "news" => "news",
        "innings" | "inning" => "inning",
        "outings" | "outing" => "outing",
        "cannings" | "canning" => "canning",
        "howe" => "howe",
        "proceed" => "proceed",
        "exceed" => "exceed",
        "succeed" => "succeed",
        _ => return None,
    })
}

fn is_vowel(c: u8) -> bool {
    matches!(c, b'a' | b'e' | b'i' | b'o' | b'u')
}

/// Consonant flag for every position: a 'y' is a consonant iff it starts the word or follows
/// a vowel (NLTK `_consonant_flags`, equal to `_is_consonant` at each index).
fn consonant_flags(w: &[u8]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let f = if is_vowel(c) {
            false
        } else if c == b'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(f);
    }
    flags
}

fn is_consonant(w: &[u8], i: usize) -> bool {
    consonant_flags(&w[..=i])[i]
}

/// m in [C](VC){m}[V]: the number of vowel→consonant transitions.
fn measure(stem: &[u8]) -> usize {
    let f = consonant_flags(stem);
    f.windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(stem: &[u8]) -> bool {
    consonant_flags(stem).iter().any(|&c| !c)
}

fn ends_double_consonant(w: &[u8]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

/// *o: the stem ends cvc where the last c is not w, x or y; NLTK also accepts a two-letter
/// vowel–consonant word.
fn ends_cvc(w: &[u8]) -> bool {
    let n = w.len();
    (n >= 3
        && is_consonant(w, n - 3)
        && !is_consonant(w, n - 2)
        && is_consonant(w, n - 1)
        && !matches!(w[n - 1], b'w' | b'x' | b'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

type Cond<'a> = Option<&'a dyn Fn(&[u8]) -> bool>;

/// NLTK `_apply_rule_list`: the first rule whose suffix matches decides; if its condition
/// fails, the word is returned unchanged. The suffix `"*d"` means "ends in a double consonant"
/// (both letters removed before the replacement is appended).
fn apply_rules(w: Vec<u8>, rules: &[(&[u8], &[u8], Cond)]) -> Vec<u8> {
    for (suffix, replacement, cond) in rules {
        if *suffix == b"*d" && ends_double_consonant(&w) {
            let stem = &w[..w.len() - 2];
            return if cond.is_none_or(|c| c(stem)) {
                [stem, replacement].concat()
            } else {
                w
            };
        }
        if w.ends_with(suffix) {
            let stem = &w[..w.len() - suffix.len()];
            return if cond.is_none_or(|c| c(stem)) {
                [stem, replacement].concat()
            } else {
                w
            };
        }
    }
    w
}

fn positive_measure(stem: &[u8]) -> bool {
    measure(stem) > 0
}

fn step1a(w: Vec<u8>) -> Vec<u8> {
    if w.ends_with(b"ies") && w.len() == 4 {
        return [&w[..1], b"ie"].concat();
    }
    apply_rules(
        w,
        &[
            (b"sses", b"ss", None),
            (b"ies", b"i", None),
            (b"ss", b"ss", None),
            (b"s", b"", None),
        ],
    )
}

fn step1b(w: Vec<u8>) -> Vec<u8> {
    if w.ends_with(b"ied") {
        let stem = &w[..w.len() - 3];
        return if w.len() == 4 {
            [stem, b"ie"].concat()
        } else {
            [stem, b"i"].concat()
        };
    }
    if w.ends_with(b"eed") {
        let stem = &w[..w.len() - 3];
        return if measure(stem) > 0 {
            [stem, b"ee"].concat()
        } else {
            w
        };
    }
    let mut intermediate: Option<Vec<u8>> = None;
    for suffix in [&b"ed"[..], &b"ing"[..]] {
        if w.ends_with(suffix) {
            let stem = &w[..w.len() - suffix.len()];
            if contains_vowel(stem) {
                intermediate = Some(stem.to_vec());
                break;
            }
        }
    }
    let Some(stem) = intermediate else {
        return w;
    };
    let last = stem.last().copied().unwrap_or(b' ');
    let last_s = [last];
    let not_lsz = move |_: &[u8]| !matches!(last, b'l' | b's' | b'z');
    let m1_cvc = |s: &[u8]| measure(s) == 1 && ends_cvc(s);
    apply_rules(
        stem,
        &[
            (b"at", b"ate", None),
            (b"bl", b"ble", None),
            (b"iz", b"ize", None),
            (b"*d", &last_s, Some(&not_lsz)),
            (b"", b"e", Some(&m1_cvc)),
        ],
    )
}

fn step1c(w: Vec<u8>) -> Vec<u8> {
    let cond = |stem: &[u8]| stem.len() > 1 && is_consonant(stem, stem.len() - 1);
    apply_rules(w, &[(b"y", b"i", Some(&cond))])
}

fn step2(w: Vec<u8>) -> Vec<u8> {
    if w.ends_with(b"alli") && positive_measure(&w[..w.len() - 4]) {
        let replaced = [&w[..w.len() - 4], b"al"].concat();
        return step2(replaced);
    }
    let pm: &dyn Fn(&[u8]) -> bool = &positive_measure;
    let word_for_logi = w.clone();
    let logi = move |_: &[u8]| positive_measure(&word_for_logi[..word_for_logi.len() - 3]);
    apply_rules(
        w,
        &[
            (b"ational", b"ate", Some(pm)),
            (b"tional", b"tion", Some(pm)),
            (b"enci", b"ence", Some(pm)),
            (b"anci", b"ance", Some(pm)),
            (b"izer", b"ize", Some(pm)),
            (b"bli", b"ble", Some(pm)),
            (b"alli", b"al", Some(pm)),
            (b"entli", b"ent", Some(pm)),
            (b"eli", b"e", Some(pm)),
            (b"ousli", b"ous", Some(pm)),
            (b"ization", b"ize", Some(pm)),
            (b"ation", b"ate", Some(pm)),
            (b"ator", b"ate", Some(pm)),
            (b"alism", b"al", Some(pm)),
            (b"iveness", b"ive", Some(pm)),
            (b"fulness", b"ful", Some(pm)),
            (b"ousness", b"ous", Some(pm)),
            (b"aliti", b"al", Some(pm)),
            (b"iviti", b"ive", Some(pm)),
            (b"biliti", b"ble", Some(pm)),
            (b"fulli", b"ful", Some(pm)),
            (b"logi", b"log", Some(&logi)),
        ],
    )
}

fn step3(w: Vec<u8>) -> Vec<u8> {
    let pm: &dyn Fn(&[u8]) -> bool = &positive_measure;
    apply_rules(
        w,
        &[
            (b"icate", b"ic", Some(pm)),
            (b"ative", b"", Some(pm)),
            (b"alize", b"al", Some(pm)),
            (b"iciti", b"ic", Some(pm)),
            (b"ical", b"ic", Some(pm)),
            (b"ful", b"", Some(pm)),
            (b"ness", b"", Some(pm)),
        ],
    )
}

fn step4(w: Vec<u8>) -> Vec<u8> {
    let gt1 = |s: &[u8]| measure(s) > 1;
    let m: &dyn Fn(&[u8]) -> bool = &gt1;
    let ion = |s: &[u8]| measure(s) > 1 && matches!(s.last(), Some(b's' | b't'));
    apply_rules(
        w,
        &[
            (b"al", b"", Some(m)),
            (b"ance", b"", Some(m)),
            (b"ence", b"", Some(m)),
            (b"er", b"", Some(m)),
            (b"ic", b"", Some(m)),
            (b"able", b"", Some(m)),
            (b"ible", b"", Some(m)),
            (b"ant", b"", Some(m)),
            (b"ement", b"", Some(m)),
            (b"ment", b"", Some(m)),
            (b"ent", b"", Some(m)),
            (b"ion", b"", Some(&ion)),
            (b"ou", b"", Some(m)),
            (b"ism", b"", Some(m)),
            (b"ate", b"", Some(m)),
            (b"iti", b"", Some(m)),
            (b"ous", b"", Some(m)),
            (b"ive", b"", Some(m)),
            (b"ize", b"", Some(m)),
        ],
    )
}

fn step5a(w: Vec<u8>) -> Vec<u8> {
    if w.ends_with(b"e") {
        let stem = &w[..w.len() - 1];
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            return stem.to_vec();
        }
    }
    w
}

fn step5b(w: Vec<u8>) -> Vec<u8> {
    let word = w.clone();
    let cond = move |_: &[u8]| measure(&word[..word.len() - 1]) > 1;
    apply_rules(w, &[(b"ll", b"l", Some(&cond))])
}

#[cfg(test)]
mod tests {
    use super::porter_stem;

    #[test]
    fn examples_from_the_paper_and_nltk() {
        // Examples quoted in NLTK's docstrings / Porter's paper, with NLTK_EXTENSIONS results.
        for (w, s) in [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"),
            ("cats", "cat"),
            ("feed", "feed"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("motoring", "motor"),
            ("sing", "sing"),
            ("hopping", "hop"),
            ("falling", "fall"),
            ("filing", "file"),
            ("happy", "happi"),
            ("enjoy", "enjoy"),
            ("relational", "relat"),
            ("generalization", "gener"),
            ("skies", "sky"),
            ("dying", "die"),
            ("controll", "control"),
        ] {
            assert_eq!(porter_stem(w), s, "{w}");
        }
    }
}
