//! Reading example files: JSONL (one object per line) or a JSON array of objects, in the TOFU
//! schema (`question` / `answer`) or raw `text`. Errors name the file and the line or item.
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// One training or scoring example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// loss on the answer (+EOS) after the chat-templated question
    Qa { question: String, answer: String },
    /// loss on every token
    Text { text: String },
}

/// Read every JSON object of a JSONL file or a JSON array file.
pub fn read_objects(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let trimmed = text.trim_start();
    let mut out = Vec::new();
    if trimmed.starts_with('[') {
        let items: Vec<Value> = serde_json::from_str(&text)
            .map_err(|e| Error::data(path, format!("invalid JSON array: {e}")))?;
        for (i, v) in items.into_iter().enumerate() {
            match v {
                Value::Object(m) => out.push(m),
                other => {
                    return Err(Error::data(
                        path,
                        format!("item {i} is not an object: {other}"),
                    ))
                }
            }
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .map_err(|e| Error::data(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
            match v {
                Value::Object(m) => out.push(m),
                other => {
                    return Err(Error::data(
                        path,
                        format!("line {}: not a JSON object: {other}", i + 1),
                    ))
                }
            }
        }
    }
    if out.is_empty() {
        return Err(Error::data(path, "contains no records"));
    }
    Ok(out)
}

/// Read examples: each record needs `question` and `answer` (strings), or `text`.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let is_jsonl = !std::fs::read_to_string(path)
        .map_err(|e| Error::io(path, e))?
        .trim_start()
        .starts_with('[');
    let where_ = |i: usize| {
        if is_jsonl {
            format!("record {} (line-ordered)", i + 1)
        } else {
            format!("item {i}")
        }
    };
    read_objects(path)?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let s = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
            match (s("question"), s("answer"), s("text")) {
                (Some(question), Some(answer), _) => Ok(Example::Qa { question, answer }),
                (_, _, Some(text)) => Ok(Example::Text { text }),
                _ => Err(Error::data(
                    path,
                    format!(
                        "{}: needs string fields 'question' and 'answer', or 'text'",
                        where_(i)
                    ),
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_jsonl_and_arrays_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(
            &p,
            "{\"question\":\"q\",\"answer\":\"a\"}\n\n{\"text\":\"t\"}\n",
        )
        .unwrap();
        assert_eq!(
            read_examples(&p).unwrap(),
            vec![
                Example::Qa {
                    question: "q".into(),
                    answer: "a".into()
                },
                Example::Text { text: "t".into() }
            ]
        );
        let p2 = dir.path().join("b.json");
        std::fs::write(&p2, "[{\"text\":\"x\"}]").unwrap();
        assert_eq!(read_examples(&p2).unwrap().len(), 1);
        std::fs::write(&p, "{\"text\":\"t\"}\n{broken\n").unwrap();
        let e = read_examples(&p).unwrap_err().to_string();
        assert!(e.contains("a.jsonl") && e.contains("line 2"), "{e}");
        std::fs::write(&p, "{\"question\":\"q\"}\n").unwrap();
        let e = read_examples(&p).unwrap_err().to_string();
        assert!(e.contains("answer"), "{e}");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_examples(&p)
            .unwrap_err()
            .to_string()
            .contains("no records"));
    }
}
