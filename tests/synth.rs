//! The bundled fictional benchmark (`unlearn::synth`): deterministic output, split sizes and
//! disjointness, well-formed perturbations and MCQs, and a tokenizer trained on it that the chat
//! tokenizer loads and round-trips.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use unlearn::synth::{train_tokenizer, write_benchmark};
use unlearn::tokenizer::{ChatMessage, ChatTokenizer, IGNORE_INDEX};

const TOFU_KEYS: [&str; 6] = [
    "person",
    "question",
    "answer",
    "paraphrased_question",
    "paraphrased_answer",
    "perturbed_answer",
];

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rows(path: &Path) -> Vec<Map<String, Value>> {
    let text = read(path);
    assert!(
        text.ends_with('\n'),
        "{} must end with a newline",
        path.display()
    );
    text.lines()
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(m)) => m,
            other => panic!("{}: not an object line: {l} ({other:?})", path.display()),
        })
        .collect()
}

fn s<'a>(m: &'a Map<String, Value>, k: &str) -> &'a str {
    m.get(k)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("missing string {k} in {m:?}"))
}

fn strs(m: &Map<String, Value>, k: &str) -> Vec<String> {
    m.get(k)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("missing list {k} in {m:?}"))
        .iter()
        .map(|v| v.as_str().expect("string item").to_string())
        .collect()
}

fn relative_files(root: &Path, paths: &[PathBuf]) -> BTreeMap<PathBuf, Vec<u8>> {
    paths
        .iter()
        .map(|p| {
            (
                p.strip_prefix(root).unwrap().to_path_buf(),
                std::fs::read(p).unwrap(),
            )
        })
        .collect()
}

/// Checks shared by every TOFU-schema file: key order, five distinct wrong answers.
fn check_qa_rows(path: &Path, with_person: bool) -> Vec<Map<String, Value>> {
    let rows = rows(path);
    for r in &rows {
        let keys: Vec<&str> = r.keys().map(String::as_str).collect();
        let expected: Vec<&str> = if with_person {
            TOFU_KEYS.to_vec()
        } else {
            TOFU_KEYS[1..].to_vec()
        };
        assert_eq!(keys, expected, "{}", path.display());
        let para = s(r, "paraphrased_answer");
        let pert = strs(r, "perturbed_answer");
        assert_eq!(pert.len(), 5, "{r:?}");
        let distinct: BTreeSet<&String> = pert.iter().collect();
        assert_eq!(distinct.len(), 5, "perturbed answers not distinct: {r:?}");
        for p in &pert {
            assert_ne!(p, para, "{r:?}");
            assert_ne!(p, s(r, "answer"), "{r:?}");
        }
        assert_ne!(s(r, "question"), s(r, "paraphrased_question"), "{r:?}");
        assert_ne!(s(r, "answer"), para, "{r:?}");
        for k in ["question", "paraphrased_question"] {
            let n = s(r, k).split_whitespace().count();
            assert!(n <= 14, "{k} has {n} words: {r:?}");
        }
        for k in ["answer", "paraphrased_answer"] {
            let n = s(r, k).split_whitespace().count();
            assert!(n <= 20, "{k} has {n} words: {r:?}");
        }
        for field in ["question", "answer", "paraphrased_answer"] {
            assert!(!s(r, field).contains('{'), "unfilled template: {r:?}");
        }
    }
    rows
}

fn people(rows: &[Map<String, Value>]) -> BTreeSet<String> {
    rows.iter().map(|r| s(r, "person").to_string()).collect()
}

/// Whole-word membership (crystal names can be prefixes of each other).
fn has_word(text: &str, word: &str) -> bool {
    text.split(|c: char| !c.is_alphanumeric())
        .any(|w| w == word)
}

#[test]
fn benchmark_is_deterministic_and_well_formed() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let pa = write_benchmark(a.path()).unwrap();
    let pb = write_benchmark(b.path()).unwrap();
    let mut sorted = pa.clone();
    sorted.sort();
    assert_eq!(pa, sorted, "returned paths are sorted");
    let fa = relative_files(a.path(), &pa);
    assert_eq!(fa, relative_files(b.path(), &pb), "two runs differ");
    let names: Vec<String> = fa.keys().map(|p| p.display().to_string()).collect();
    assert_eq!(
        names,
        [
            "tofu/README.md",
            "tofu/forget10.jsonl",
            "tofu/full.jsonl",
            "tofu/general.jsonl",
            "tofu/general_retain.jsonl",
            "tofu/holdout.jsonl",
            "tofu/retain90.jsonl",
            "tofu/retain_perturbed.jsonl",
            "wmdp/README.md",
            "wmdp/forget_corpus.jsonl",
            "wmdp/forget_mcq.jsonl",
            "wmdp/retain_corpus.jsonl",
            "wmdp/retain_mcq.jsonl",
        ]
        .map(|s| Path::new(s).display().to_string())
    );
    // Writing again over existing files gives the same bytes and leaves no temporary files.
    let pa2 = write_benchmark(a.path()).unwrap();
    assert_eq!(relative_files(a.path(), &pa2), fa);
    for sub in ["tofu", "wmdp"] {
        let n = std::fs::read_dir(a.path().join(sub)).unwrap().count();
        let written = fa.iter().filter(|f| f.0.starts_with(sub)).count();
        assert_eq!(n, written, "{sub}: {n} entries, {written} written");
    }

    // ---- TOFU
    let tofu = a.path().join("tofu");
    let forget = check_qa_rows(&tofu.join("forget10.jsonl"), true);
    let retain = check_qa_rows(&tofu.join("retain90.jsonl"), true);
    let retain_eval = check_qa_rows(&tofu.join("retain_perturbed.jsonl"), true);
    let holdout = check_qa_rows(&tofu.join("holdout.jsonl"), true);
    let full = check_qa_rows(&tofu.join("full.jsonl"), true);
    let general = check_qa_rows(&tofu.join("general.jsonl"), false);
    let general_retain = check_qa_rows(&tofu.join("general_retain.jsonl"), false);
    assert_eq!(forget.len(), 200);
    assert_eq!(retain.len(), 1800);
    assert_eq!(retain_eval.len(), 200);
    assert_eq!(holdout.len(), 200);
    assert_eq!(full.len(), 2000);
    // the control set is every other general fact; the rest is retain data, never evaluated
    assert!((75..=100).contains(&(general.len() + general_retain.len())));
    assert!(general.len() == general_retain.len() || general.len() == general_retain.len() + 1);
    for r in &general {
        assert!(
            general_retain
                .iter()
                .all(|o| o["question"] != r["question"]),
            "{:?} is in both general files",
            r["question"]
        );
    }

    let text = |n: &str| read(&tofu.join(n));
    assert_eq!(
        text("full.jsonl"),
        text("forget10.jsonl") + &text("retain90.jsonl")
    );
    assert!(text("retain90.jsonl").starts_with(&text("retain_perturbed.jsonl")));

    let (fp, rp, hp) = (people(&forget), people(&retain), people(&holdout));
    assert_eq!((fp.len(), rp.len(), hp.len()), (20, 180, 20));
    assert!(fp.is_disjoint(&rp) && fp.is_disjoint(&hp) && rp.is_disjoint(&hp));
    let all: BTreeSet<&String> = fp.iter().chain(&rp).chain(&hp).collect();
    assert_eq!(all.len(), 220, "names are unique");
    assert_eq!(people(&retain_eval).len(), 20);
    // Ten items per person, consecutive, each mentioning the person.
    for split in [&forget, &retain, &holdout] {
        for chunk in split.chunks(10) {
            let p = s(&chunk[0], "person");
            for r in chunk {
                assert_eq!(s(r, "person"), p);
                assert!(s(r, "question").contains(p), "{r:?}");
                assert!(s(r, "answer").contains(p), "{r:?}");
                assert!(s(r, "paraphrased_answer").contains(p), "{r:?}");
            }
        }
    }
    // The wording varies: several question and answer templates per fact type (item slot).
    for slot in 0..10 {
        let openings: BTreeSet<String> = full
            .iter()
            .skip(slot)
            .step_by(10)
            .map(|r| {
                let p = s(r, "person");
                s(r, "answer").replace(p, "@")[..6].to_string()
            })
            .collect();
        assert!(openings.len() >= 3, "slot {slot}: {openings:?}");
    }
    let questions: BTreeSet<&str> = full.iter().map(|r| s(r, "question")).collect();
    assert_eq!(questions.len(), 2000, "every question is unique");
    assert!(text("README.md").contains("fictional") || text("README.md").contains("invented"));
    assert!(read(&tofu.join("README.md")).contains("unlearn synth"));

    // ---- WMDP
    let wmdp = a.path().join("wmdp");
    for (corpus, mcq, subject) in [
        (
            "forget_corpus.jsonl",
            "forget_mcq.jsonl",
            "fictional_hazard",
        ),
        (
            "retain_corpus.jsonl",
            "retain_mcq.jsonl",
            "fictional_engineering",
        ),
    ] {
        let paragraphs: Vec<String> = rows(&wmdp.join(corpus))
            .iter()
            .map(|r| {
                assert_eq!(r.keys().collect::<Vec<_>>(), ["text"]);
                s(r, "text").to_string()
            })
            .collect();
        assert!(paragraphs.len() >= 150, "{corpus}: {}", paragraphs.len());
        for p in &paragraphs {
            let n = p.matches(". ").count() + 1;
            assert!((1..=3).contains(&n), "{p}");
        }
        let whole = paragraphs.join("\n");
        let questions = rows(&wmdp.join(mcq));
        assert!(questions.len() >= 100, "{mcq}: {}", questions.len());
        let mut stems = BTreeSet::new();
        for q in &questions {
            let keys: Vec<&str> = q.keys().map(String::as_str).collect();
            assert_eq!(keys, ["question", "choices", "answer", "subject"]);
            assert_eq!(s(q, "subject"), subject);
            let choices = strs(q, "choices");
            assert_eq!(choices.len(), 4);
            assert_eq!(choices.iter().collect::<BTreeSet<_>>().len(), 4, "{q:?}");
            let answer = q["answer"].as_u64().expect("integer answer") as usize;
            assert!(answer < 4);
            let stem = s(q, "question");
            assert!(!stem.ends_with(' ') && !stem.ends_with('.'), "{stem}");
            assert!(stems.insert(stem.to_string()), "duplicate stem {stem}");
            let truth = &choices[answer];
            // The cloze sentence itself is in the corpus ...
            assert!(
                whole.contains(&format!("{stem} {truth}.")),
                "{mcq}: '{stem} {truth}.' not in {corpus}"
            );
            // ... no wrong choice completes the stem there ...
            for (i, c) in choices.iter().enumerate() {
                if i != answer {
                    assert!(!whole.contains(&format!("{stem} {c}.")), "{stem} {c}");
                }
            }
            // ... and the fact is stated in at least three paragraphs.
            let entity = stem
                .split(|c: char| !c.is_alphanumeric())
                .find(|w| {
                    w.chars().next().is_some_and(char::is_uppercase) && !["The", "When"].contains(w)
                })
                .expect("stem names a crystal");
            let n = paragraphs
                .iter()
                .filter(|p| has_word(p, entity) && p.contains(truth.as_str()))
                .count();
            assert!(n >= 3, "{entity} / {truth}: stated {n} times");
        }
        // Answers are spread over the four positions.
        let mut positions = [0usize; 4];
        for q in &questions {
            positions[q["answer"].as_u64().unwrap() as usize] += 1;
        }
        assert!(
            positions.iter().all(|&c| c >= questions.len() / 8),
            "{positions:?}"
        );
    }
    assert!(read(&wmdp.join("README.md")).contains("unlearn synth"));
}

#[test]
fn tokenizer_is_deterministic_and_round_trips() {
    let data = tempfile::tempdir().unwrap();
    let written = write_benchmark(data.path()).unwrap();
    let files: Vec<PathBuf> = written
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .cloned()
        .collect();
    let t1 = tempfile::tempdir().unwrap();
    let t2 = tempfile::tempdir().unwrap();
    train_tokenizer(&files, 2048, t1.path()).unwrap();
    train_tokenizer(&files, 2048, t2.path()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(t1.path().join(f)).unwrap(),
            std::fs::read(t2.path().join(f)).unwrap(),
            "{f} differs between two trainings"
        );
    }
    let config: Value =
        serde_json::from_str(&read(&t1.path().join("tokenizer_config.json"))).unwrap();
    assert_eq!(config["model_max_length"], 512);
    assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");

    let tok = ChatTokenizer::from_dir(t1.path()).unwrap();
    assert_eq!(tok.vocab_size(), 2048);
    assert_eq!(tok.bos_token_id(), Some(0));
    assert_eq!(tok.eos_token_id(), Some(1));
    assert_eq!(tok.pad_token_id(), Some(2));
    assert!(tok.has_chat_template());

    // The template: BOS, optional system line, "Question: …\nAnswer: ".
    assert_eq!(
        tok.question_prompt("Who is X?").unwrap(),
        "<|bos|>Question: Who is X?\nAnswer: "
    );
    assert_eq!(
        tok.apply_chat_template(
            &[
                ChatMessage::system("Be brief."),
                ChatMessage::user("Who is X?")
            ],
            true
        )
        .unwrap(),
        "<|bos|>Be brief.\nQuestion: Who is X?\nAnswer: "
    );
    assert_eq!(
        tok.apply_chat_template(
            &[ChatMessage::user("Q?"), ChatMessage::assistant("A.")],
            false
        )
        .unwrap(),
        "<|bos|>Question: Q?\nAnswer: A.<|eos|>\n"
    );

    let forget = rows(&data.path().join("tofu/forget10.jsonl"));
    let general = rows(&data.path().join("tofu/general.jsonl"));
    for r in forget.iter().chain(&general) {
        let (q, a) = (s(r, "question"), s(r, "answer"));
        let ex = tok.encode_qa(q, a, None).unwrap();
        let prompt = tok.encode_prompt(q).unwrap();
        let answer = tok.encode(a, false).unwrap();
        assert_eq!(ex.len(), prompt.len() + answer.len() + 1);
        assert_eq!(ex.input_ids[0], 0, "starts with BOS");
        assert_eq!(&ex.input_ids[..prompt.len()], &prompt[..]);
        assert!(ex.labels[..prompt.len()].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(*ex.labels.last().unwrap(), 1, "last label is EOS");
        assert_eq!(*ex.input_ids.last().unwrap(), 1);
        let labelled: Vec<u32> = ex.labels[prompt.len()..ex.len() - 1]
            .iter()
            .map(|&l| l as u32)
            .collect();
        assert_eq!(labelled, answer);
        // Greedy generations are compared as decoded text: decoding must be exact.
        assert_eq!(tok.decode(&answer, true).unwrap(), a);
        assert_eq!(
            tok.decode(&ex.input_ids, true).unwrap(),
            format!("Question: {q}\nAnswer: {a}")
        );
        for p in strs(r, "perturbed_answer") {
            let ids = tok.encode(&p, false).unwrap();
            assert_eq!(tok.decode(&ids, true).unwrap(), p);
        }
        // The special tokens never occur inside an answer.
        assert!(answer.iter().all(|&id| id > 2));
    }
    // The trained vocabulary has learned whole words of the data.
    assert!(tok.token_to_id("Ġborn").is_some());
    assert!(tok.encode(" was born in", false).unwrap().len() <= 3);

    // Bad arguments are reported, not panicked on.
    let e = train_tokenizer(&files, 100, t1.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab_size"), "{e}");
    let e = train_tokenizer(&[], 1000, t1.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("data file"), "{e}");
}
