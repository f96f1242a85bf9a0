//! report.md: the summary as a table, then notes and a few generations per split.
use super::suite::Suite;
use serde_json::Value;
use std::fmt::Write;

/// How many items per split the report shows.
const SAMPLES: usize = 5;
/// Longest text shown in a table cell.
const CELL: usize = 160;

pub fn number(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if !v.is_finite() {
        v.to_string()
    } else if v.abs() < 1e-3 || v.abs() >= 1e6 {
        format!("{v:.3e}")
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

fn value(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::Number(n) => n.as_f64().map(number).unwrap_or_else(|| n.to_string()),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(value).collect::<Vec<_>>().join(", "),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| format!("{k}: {}", value(v)))
            .collect::<Vec<_>>()
            .join(", "),
        Value::Bool(b) => b.to_string(),
    }
}

/// A Markdown table cell: one line, pipes escaped, shortened.
fn cell(s: &str) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let short: String = if one.chars().count() > CELL {
        one.chars().take(CELL).collect::<String>() + "…"
    } else {
        one
    };
    short.replace('|', "\\|")
}

pub fn render(log: &Value, suite: &Suite) -> String {
    let mut r = String::new();
    let s = |k: &str| log.get(k).map(value).unwrap_or_default();
    let _ = writeln!(r, "# Evaluation: {}\n", suite.name);
    if !suite.description.is_empty() {
        let _ = writeln!(r, "{}\n", suite.description);
    }
    let _ = writeln!(r, "| | |\n|---|---|");
    let _ = writeln!(r, "| model | {} |", cell(&s("model")));
    if log["adapter"].is_string() {
        let _ = writeln!(r, "| adapter | {} |", cell(&s("adapter")));
    }
    let _ = writeln!(
        r,
        "| suite | {} (kind {}) |",
        cell(&s("suite")),
        s("suite_kind")
    );
    if let Some(splits) = log["splits"].as_object() {
        for (name, sp) in splits {
            let n = sp["items"].as_array().map_or(0, Vec::len);
            let _ = writeln!(
                r,
                "| data: {name} | {} ({n} items) |",
                cell(&value(&sp["source"]))
            );
        }
    }
    match &log["reference"] {
        Value::Null => {}
        v => {
            let what = v
                .get("model")
                .or_else(|| v.get("log"))
                .map(value)
                .unwrap_or_default();
            let _ = writeln!(r, "| retain reference | {} |", cell(&what));
        }
    }
    let _ = writeln!(
        r,
        "| settings | max_new_tokens {}, generation batch {}, scoring batch {}, max_length {} |",
        suite.generation.max_new_tokens,
        suite.generation.batch_size,
        suite.scoring.batch_size,
        suite.scoring.max_length
    );
    let _ = writeln!(r, "| device | {} ({}) |", s("device"), s("dtype"));

    let summary = log["summary"].as_object().cloned().unwrap_or_default();
    let _ = writeln!(r, "\n## Summary\n\n| metric | value |\n|---|---:|");
    let mut shown = vec![];
    for k in suite
        .headline
        .iter()
        .filter(|k| summary.contains_key(k.as_str()))
        .chain(summary.keys().filter(|k| !suite.headline.contains(k)))
    {
        if summary[k.as_str()].is_object() || shown.contains(k) {
            continue;
        }
        shown.push(k.clone());
        let bold = suite.headline.contains(k);
        let name = if bold { format!("**{k}**") } else { k.clone() };
        let _ = writeln!(r, "| {name} | {} |", cell(&value(&summary[k.as_str()])));
    }
    for (k, v) in summary.iter().filter(|(_, v)| v.is_object()) {
        let _ = writeln!(r, "\n### {k}\n\n| | |\n|---|---:|");
        if let Some(o) = v.as_object() {
            for (kk, vv) in o {
                let _ = writeln!(r, "| {} | {} |", cell(kk), value(vv));
            }
        }
    }
    if let Some(notes) = log["notes"].as_array().filter(|n| !n.is_empty()) {
        let _ = writeln!(r, "\n## Notes\n");
        for n in notes {
            let _ = writeln!(r, "- {}", value(n));
        }
    }
    if let Some(splits) = log["splits"].as_object() {
        let with_gen: Vec<_> = splits
            .iter()
            .filter(|(_, sp)| sp["items"][0].get("generation").is_some())
            .collect();
        if !with_gen.is_empty() {
            let _ = writeln!(
                r,
                "\n## Generations (first {SAMPLES} per split)\n\n| split | question | answer | generation | ROUGE-L recall |\n|---|---|---|---|---:|"
            );
            for (name, sp) in with_gen {
                for it in sp["items"].as_array().into_iter().flatten().take(SAMPLES) {
                    let _ = writeln!(
                        r,
                        "| {name} | {} | {} | {} | {} |",
                        cell(&value(&it["question"])),
                        cell(&value(&it["answer"])),
                        cell(&value(&it["generation"])),
                        value(&it["scores"]["rougeL_recall"])
                    );
                }
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_cells() {
        assert_eq!(number(0.5), "0.5000");
        assert_eq!(number(1.06e-239), "1.060e-239");
        assert_eq!(number(400.0), "400");
        assert_eq!(cell("a|b\nc"), "a\\|b c");
    }
}
