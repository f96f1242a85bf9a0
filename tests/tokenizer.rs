//! Tokenizer and chat-template tests against values produced by transformers.
//!
//! Ground truth was produced once with transformers 5.23.0 / tokenizers 0.23.3 / Jinja2 3.1.6
//! (`pip install transformers tokenizers jinja2`), run from the crate root:
//!
//! ```python
//! import json
//! from transformers import AutoTokenizer, PreTrainedTokenizerFast
//! d = "tests/fixtures/hf/llama"
//! tok = AutoTokenizer.from_pretrained(d)
//! print(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)  # 0 1 2 None
//! for t in [ASCII, UNICODE, MULTILINE]:
//!     print(tok.encode(t, add_special_tokens=False), tok.encode(t, add_special_tokens=True))
//!     ids = tok.encode(t, add_special_tokens=True)
//!     print(repr(tok.decode(ids, skip_special_tokens=False)), repr(tok.decode(ids, skip_special_tokens=True)))
//! q, a = "What is the capital of France?", "Paris is the capital."
//! m1 = [{"role": "user", "content": q}]
//! m2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]
//! r1 = tok.apply_chat_template(m1, tokenize=False, add_generation_prompt=True)
//! r2 = tok.apply_chat_template(m2, tokenize=False, add_generation_prompt=False)
//! p = tok(r1, add_special_tokens=False)["input_ids"]
//! ans = tok(a, add_special_tokens=False)["input_ids"]
//! full = p + ans + [tok.eos_token_id]
//! print(p, ans, full, [-100] * len(p) + ans + [tok.eos_token_id])
//! print(json.dumps(tok.decode(full, skip_special_tokens=False)), json.dumps(tok.decode(full, skip_special_tokens=True)))
//! fb = PreTrainedTokenizerFast(tokenizer_file=d + "/tokenizer.json")   # no tokenizer_config.json
//! print(fb.chat_template, fb.eos_token_id)                               # None None
//! print(fb(f"Question: {q}\nAnswer: ", add_special_tokens=True)["input_ids"])
//! ```
//!
//! and, for the Python-compatibility template (`COMPLEX_TEMPLATE` below, written into a copy of
//! the fixture's tokenizer_config.json as "chat_template"):
//!
//! ```python
//! tok = AutoTokenizer.from_pretrained(tmpdir)
//! msgs = [{"role": "system", "content": "  Be brief.  "},
//!         {"role": "user", "content": "What is the capital of France?"},
//!         {"role": "assistant", "content": "Zoë — 日本\n\"quoted\""}]
//! for agp in (True, False):
//!     print(json.dumps(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp), ensure_ascii=False))
//! ```
//!
//! and likewise for `SCOPING_TEMPLATE` with the messages user "a", assistant "b", user "c" and
//! `add_generation_prompt=False`.
use std::path::{Path, PathBuf};

use unlearn::tokenizer::{ChatMessage, ChatTokenizer, EncodedExample};
use unlearn::Error;

const ASCII: &str = "The quick brown fox jumps over the lazy dog.";
const ASCII_IDS: [u32; 30] = [
    276, 223, 83, 87, 281, 77, 273, 84, 292, 274, 81, 90, 223, 76, 87, 79, 82, 85, 265, 88, 269,
    267, 223, 78, 305, 91, 223, 311, 73, 16,
];
const UNICODE: &str = "Zoë — 日本";
const UNICODE_IDS: [u32; 15] = [
    60, 81, 130, 107, 223, 161, 225, 245, 223, 165, 248, 101, 165, 253, 108,
];
const MULTILINE: &str = "line one\nline two\n\n  indented\tTab end";
const MULTILINE_IDS: [u32; 29] = [
    78, 262, 71, 265, 80, 71, 201, 78, 262, 71, 260, 89, 81, 201, 201, 223, 285, 70, 278, 86, 71,
    70, 200, 54, 67, 68, 223, 278, 70,
];

const QUESTION: &str = "What is the capital of France?";
const ANSWER: &str = "Paris is the capital.";
const RENDER_USER_GEN: &str =
    "<|begin_of_text|><|user|>\nWhat is the capital of France?<|end_of_text|><|assistant|>\n";
const RENDER_CONVERSATION: &str = "<|begin_of_text|><|system|>\nBe brief.<|end_of_text|><|user|>\nWhat is the capital of France?<|end_of_text|><|assistant|>\nParis is the capital.<|end_of_text|>";
const PROMPT_IDS: [u32; 42] = [
    0, 30, 94, 87, 85, 269, 94, 32, 201, 57, 74, 304, 223, 75, 85, 267, 223, 69, 302, 75, 86, 277,
    290, 223, 40, 84, 301, 307, 33, 1, 30, 94, 268, 85, 75, 85, 86, 301, 86, 94, 32, 201,
];
const ANSWER_IDS: [u32; 15] = [
    50, 303, 75, 85, 223, 75, 85, 267, 223, 69, 302, 75, 86, 277, 16,
];
const FALLBACK_PROMPT_IDS: [u32; 36] = [
    0, 299, 270, 86, 75, 81, 80, 28, 223, 57, 74, 304, 223, 75, 85, 267, 223, 69, 302, 75, 86, 277,
    290, 223, 40, 84, 301, 307, 33, 201, 296, 85, 89, 269, 28, 223,
];
const EOS: u32 = 1;

/// Exercises Python string/dict methods, namespace, `tojson`, None/True rendering, an undefined
/// special token (`unk_token`) and the `{% generation %}` tag.
const COMPLEX_TEMPLATE: &str = r#"{%- set sys = namespace(text='') -%}
{%- if messages[0]['role'] == 'system' %}{% set sys.text = messages[0]['content'].strip() %}{% endif -%}
{{ bos_token }}[{{ sys.text | upper }}]
{% for m in messages if m.role != 'system' %}
  {% if m['role'].startswith(('us', 'xx')) %}
{{ loop.index }}. {{ m.content.replace('capital', 'CAPITAL').split(' ')[0:3] | join('_') }} {{ m.get('missing', 'dflt') }} {{ m.content.title() }}
  {% else %}
{{ m | tojson }}
{{ m | tojson(indent=2) }}
  {% endif %}
{% endfor %}
{{ add_generation_prompt }} {{ none }} [{{ unk_token }}] {{ pad_token }} {{ {'k': [1, 2.5, true, none, 'é"\n']} | tojson }} {{ "a,b,,c".split(",") | length }} {{ "  x  y ".split() | join('|') }} {{ 'ab'.endswith('b') }}
{% generation %}gen {{ eos_token }}{% endgeneration %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}
"#;
const COMPLEX_AGP_TRUE: &str = "<|begin_of_text|>[BE BRIEF.]\n1. What_is_the dflt What Is The Capital Of France?\n{\"role\": \"assistant\", \"content\": \"Zoë — 日本\\n\\\"quoted\\\"\"}\n{\n  \"role\": \"assistant\",\n  \"content\": \"Zoë — 日本\\n\\\"quoted\\\"\"\n}\nTrue None [] <|pad|> {\"k\": [1, 2.5, true, null, \"é\\\"\\n\"]} 4 x|y True\ngen <|end_of_text|><|assistant|>\n";
const COMPLEX_AGP_FALSE: &str = "<|begin_of_text|>[BE BRIEF.]\n1. What_is_the dflt What Is The Capital Of France?\n{\"role\": \"assistant\", \"content\": \"Zoë — 日本\\n\\\"quoted\\\"\"}\n{\n  \"role\": \"assistant\",\n  \"content\": \"Zoë — 日本\\n\\\"quoted\\\"\"\n}\nFalse None [] <|pad|> {\"k\": [1, 2.5, true, null, \"é\\\"\\n\"]} 4 x|y True\ngen <|end_of_text|>";

/// Jinja2 details: backslash-newline line continuation in a string literal (Mistral templates),
/// `set` inside a loop not leaking out, `selectattr`, dict equality, `split`, `map`, `items()`.
const SCOPING_TEMPLATE: &str = r#"{%- set greeting = "Hello \
world" %}
{%- set users = messages | selectattr("role", "equalto", "user") | list %}
{%- set acc = [] %}{% for m in messages %}{% set acc = acc + [m] %}{% endfor %}
{{- greeting }}|{{ acc | length }}|{% for m in messages %}{{ m == users[-1] }},{% endfor %}|{{ '<think>a</think>x'.split('</think>')[-1] }}|{{ messages[1:] | map(attribute='content') | join('+') }}|{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}
"#;
const SCOPING_EXPECTED: &str = "Hello world|0|False,False,True,|x|b+c|role=user;content=a;";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama")
}

fn load() -> ChatTokenizer {
    ChatTokenizer::from_dir(&fixture_dir()).unwrap()
}

/// A temp dir holding a copy of the fixture's tokenizer.json and, if given, a tokenizer_config.json.
fn temp_model(config: Option<serde_json::Value>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    if let Some(cfg) = config {
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::to_string_pretty(&cfg).unwrap(),
        )
        .unwrap();
    }
    dir
}

fn fixture_config() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("tokenizer_config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn with_bos(ids: &[u32]) -> Vec<u32> {
    std::iter::once(0).chain(ids.iter().copied()).collect()
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("Be brief."),
        ChatMessage::user(QUESTION),
        ChatMessage::assistant(ANSWER),
    ]
}

#[test]
fn special_tokens_resolve_through_vocabulary() {
    let tok = load();
    assert_eq!(tok.bos_token_id(), Some(0));
    assert_eq!(tok.eos_token_id(), Some(1));
    assert_eq!(tok.pad_token_id(), Some(2));
    assert_eq!(tok.unk_token_id(), None);
    assert_eq!(tok.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(tok.eos_token(), Some("<|end_of_text|>"));
    assert!(tok.has_chat_template());
}

#[test]
fn added_token_object_form_is_accepted() {
    let mut cfg = fixture_config();
    cfg["eos_token"] = serde_json::json!({
        "__type": "AddedToken", "content": "<|pad|>", "lstrip": false, "normalized": false,
        "rstrip": false, "single_word": false, "special": true
    });
    cfg["bos_token"] = serde_json::Value::Null;
    let dir = temp_model(Some(cfg));
    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.bos_token_id(), None);
}

#[test]
fn encode_matches_transformers() {
    let tok = load();
    for (text, ids) in [
        (ASCII, &ASCII_IDS[..]),
        (UNICODE, &UNICODE_IDS[..]),
        (MULTILINE, &MULTILINE_IDS[..]),
    ] {
        assert_eq!(tok.encode(text, false).unwrap(), ids, "{text:?}");
        assert_eq!(tok.encode(text, true).unwrap(), with_bos(ids), "{text:?}");
    }
    // Special tokens in text are matched as added tokens, as in transformers.
    assert_eq!(
        tok.encode("<|begin_of_text|>hi<|pad|>", false).unwrap(),
        [0, 74, 75, 2]
    );
}

#[test]
fn decode_round_trips() {
    let tok = load();
    for text in [ASCII, UNICODE, MULTILINE] {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            format!("<|begin_of_text|>{text}")
        );
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
    }
    let full: Vec<u32> = PROMPT_IDS
        .iter()
        .chain(ANSWER_IDS.iter())
        .copied()
        .chain([EOS])
        .collect();
    assert_eq!(
        tok.decode(&full, false).unwrap(),
        "<|begin_of_text|><|user|>\nWhat is the capital of France?<|end_of_text|><|assistant|>\nParis is the capital.<|end_of_text|>"
    );
    assert_eq!(
        tok.decode(&full, true).unwrap(),
        "<|user|>\nWhat is the capital of France?<|assistant|>\nParis is the capital."
    );
}

#[test]
fn chat_template_renders_like_transformers() {
    let tok = load();
    assert_eq!(
        tok.apply_chat_template(&[ChatMessage::user(QUESTION)], true)
            .unwrap(),
        RENDER_USER_GEN
    );
    assert_eq!(
        tok.apply_chat_template(&conversation(), false).unwrap(),
        RENDER_CONVERSATION
    );
    assert_eq!(tok.question_prompt(QUESTION).unwrap(), RENDER_USER_GEN);
    assert_eq!(tok.encode_prompt(QUESTION).unwrap(), PROMPT_IDS);
}

#[test]
fn python_compatible_template_features() {
    let mut cfg = fixture_config();
    cfg["chat_template"] = serde_json::Value::String(COMPLEX_TEMPLATE.into());
    let dir = temp_model(Some(cfg));
    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();
    let msgs = [
        ChatMessage::system("  Be brief.  "),
        ChatMessage::user(QUESTION),
        ChatMessage::assistant("Zoë — 日本\n\"quoted\""),
    ];
    assert_eq!(
        tok.apply_chat_template(&msgs, true).unwrap(),
        COMPLEX_AGP_TRUE
    );
    assert_eq!(
        tok.apply_chat_template(&msgs, false).unwrap(),
        COMPLEX_AGP_FALSE
    );
}

#[test]
fn jinja2_scoping_and_line_continuation() {
    let mut cfg = fixture_config();
    cfg["chat_template"] = serde_json::Value::String(SCOPING_TEMPLATE.into());
    let dir = temp_model(Some(cfg));
    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();
    let msgs = [
        ChatMessage::user("a"),
        ChatMessage::assistant("b"),
        ChatMessage::user("c"),
    ];
    assert_eq!(
        tok.apply_chat_template(&msgs, false).unwrap(),
        SCOPING_EXPECTED
    );
}

#[test]
fn strftime_now_is_available() {
    let mut cfg = fixture_config();
    cfg["chat_template"] = serde_json::Value::String("{{ strftime_now('%Y-%m-%d') }}".into());
    let dir = temp_model(Some(cfg));
    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();
    let out = tok.apply_chat_template(&[], false).unwrap();
    let parts: Vec<&str> = out.split('-').collect();
    assert_eq!(parts.len(), 3, "{out}");
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [4, 2, 2],
        "{out}"
    );
    assert!(out.chars().all(|c| c.is_ascii_digit() || c == '-'), "{out}");
    assert!(parts[0].parse::<u32>().unwrap() >= 2024, "{out}");
}

#[test]
fn template_sources_chat_template_jinja_and_named_list() {
    // chat_template.jinja takes priority over tokenizer_config.json.
    let dir = temp_model(Some(fixture_config()));
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}",
    )
    .unwrap();
    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tok.apply_chat_template(&[ChatMessage::user("hi")], true)
            .unwrap(),
        "[user]hi\n"
    );

    // A list of named templates: the "default" one is used.
    let mut cfg = fixture_config();
    cfg["chat_template"] = serde_json::json!([
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ messages[0]['content'] }}!"}
    ]);
    let dir = temp_model(Some(cfg));
    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.question_prompt("Why?").unwrap(), "Why?!");
}

#[test]
fn encode_qa_masks_the_prompt() {
    let tok = load();
    let ex = tok.encode_qa(QUESTION, ANSWER, None).unwrap();
    let mut ids = PROMPT_IDS.to_vec();
    ids.extend_from_slice(&ANSWER_IDS);
    ids.push(EOS);
    let mut labels = vec![-100i64; PROMPT_IDS.len()];
    labels.extend(ANSWER_IDS.iter().map(|&i| i64::from(i)));
    labels.push(i64::from(EOS));
    assert_eq!(ex.input_ids, ids);
    assert_eq!(ex.labels, labels);
    assert_eq!(ex.len(), 58);
    assert_eq!(ex.num_labelled(), ANSWER_IDS.len() + 1);
}

#[test]
fn encode_qa_truncates_keeping_the_start() {
    let tok = load();
    let full = tok.encode_qa(QUESTION, ANSWER, None).unwrap();
    let ex = tok.encode_qa(QUESTION, ANSWER, Some(45)).unwrap();
    assert_eq!(ex.input_ids, &full.input_ids[..45]);
    assert_eq!(ex.labels, &full.labels[..45]);
    assert_eq!(ex.labels[41], -100);
    assert_eq!(&ex.labels[42..], [50, 303, 75]);
    // A limit above the length changes nothing.
    assert_eq!(tok.encode_qa(QUESTION, ANSWER, Some(1000)).unwrap(), full);
    // A limit inside the prompt leaves no labelled token.
    let ex = tok.encode_qa(QUESTION, ANSWER, Some(10)).unwrap();
    assert_eq!(ex.input_ids, &PROMPT_IDS[..10]);
    assert_eq!(ex.num_labelled(), 0);
}

#[test]
fn encode_text_labels_every_token() {
    let tok = load();
    let ex = tok.encode_text(UNICODE, None).unwrap();
    let ids = with_bos(&UNICODE_IDS);
    assert_eq!(ex.input_ids, ids);
    assert_eq!(
        ex.labels,
        ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>()
    );
    let ex = tok.encode_text(ASCII, Some(5)).unwrap();
    assert_eq!(
        ex,
        EncodedExample {
            input_ids: vec![0, 276, 223, 83, 87],
            labels: vec![0, 276, 223, 83, 87],
        }
    );
}

#[test]
fn fallback_prompt_without_tokenizer_config() {
    let dir = temp_model(None);
    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert!(!tok.has_chat_template());
    assert_eq!(tok.eos_token_id(), None);
    assert_eq!(tok.bos_token_id(), None);
    assert_eq!(
        tok.question_prompt(QUESTION).unwrap(),
        "Question: What is the capital of France?\nAnswer: "
    );
    assert_eq!(tok.encode_prompt(QUESTION).unwrap(), FALLBACK_PROMPT_IDS);
    assert_eq!(tok.encode(ASCII, false).unwrap(), ASCII_IDS);
    // No EOS: encode_qa fails and names the tokenizer file.
    let err = tok.encode_qa(QUESTION, ANSWER, None).unwrap_err();
    assert!(matches!(err, Error::Tokenizer { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer.json") && msg.contains("EOS"),
        "{msg}"
    );
    // Rendering a template that does not exist is an error, not a panic.
    let err = tok.apply_chat_template(&[], false).unwrap_err();
    assert!(matches!(err, Error::Template { .. }), "{err:?}");
}

#[test]
fn fallback_prompt_with_config_but_no_template() {
    let mut cfg = fixture_config();
    cfg.as_object_mut().unwrap().remove("chat_template");
    let dir = temp_model(Some(cfg));
    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert!(!tok.has_chat_template());
    let ex = tok.encode_qa(QUESTION, ANSWER, None).unwrap();
    let mut ids = FALLBACK_PROMPT_IDS.to_vec();
    ids.extend_from_slice(&ANSWER_IDS);
    ids.push(EOS);
    assert_eq!(ex.input_ids, ids);
    assert_eq!(ex.num_labelled(), ANSWER_IDS.len() + 1);
    assert!(ex.labels[..FALLBACK_PROMPT_IDS.len()]
        .iter()
        .all(|&l| l == -100));
}

#[test]
fn missing_tokenizer_json_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let err = ChatTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Tokenizer { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.path().join("tokenizer.json").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn corrupt_tokenizer_json_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = ChatTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Tokenizer { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.path().join("tokenizer.json").display().to_string()),
        "{msg}"
    );
}

#[test]
fn corrupt_tokenizer_config_is_reported() {
    let dir = temp_model(None);
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"eos_token\": ").unwrap();
    let err = ChatTokenizer::from_dir(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("tokenizer_config.json"), "{msg}");
}

#[test]
fn raise_exception_is_reported_with_the_config_file() {
    let mut cfg = fixture_config();
    cfg["chat_template"] = serde_json::Value::String(
        "{% if messages|length > 1 %}{{ raise_exception('Only one message is supported') }}{% endif %}{{ messages[0].content }}".into(),
    );
    let dir = temp_model(Some(cfg));
    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tok.apply_chat_template(&[ChatMessage::user("ok")], false)
            .unwrap(),
        "ok"
    );
    let err = tok.apply_chat_template(&conversation(), false).unwrap_err();
    assert!(matches!(err, Error::Template { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("tokenizer_config.json"), "{msg}");
    assert!(msg.contains("Only one message is supported"), "{msg}");
}

#[test]
fn template_syntax_error_is_reported_on_use() {
    let mut cfg = fixture_config();
    cfg["chat_template"] = serde_json::Value::String("{% for m in messages %}".into());
    let dir = temp_model(Some(cfg));
    // Loading still works (transformers compiles templates lazily) ...
    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.encode(ASCII, false).unwrap(), ASCII_IDS);
    // ... but rendering names the file.
    let err = tok.question_prompt("x").unwrap_err();
    assert!(matches!(err, Error::Template { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

#[test]
fn chat_tokenizer_can_be_shared_across_threads() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    assert_send_sync_clone::<ChatTokenizer>();
    let tok = load();
    let ids = std::thread::scope(|s| {
        s.spawn(|| tok.encode_qa(QUESTION, ANSWER, None).unwrap())
            .join()
            .unwrap()
    });
    assert_eq!(ids, tok.encode_qa(QUESTION, ANSWER, None).unwrap());
}

/// open-unlearning's Llama-3 prompt style: a system message and the template's `date_string`.
#[test]
fn prompt_style_adds_the_system_message_and_date_string() {
    use unlearn::tokenizer::PromptStyle;
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let plain = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        plain.question_prompt("Who?").unwrap(),
        "<|begin_of_text|><|user|>\nWho?<|end_of_text|><|assistant|>\n"
    );
    let style = PromptStyle {
        system_prompt: Some("You are a helpful assistant.".into()),
        date_string: Some("10 Apr 2025".into()),
    };
    let styled = plain.clone().with_prompt_style(style.clone());
    assert_eq!(
        styled.question_prompt("Who?").unwrap(),
        "<|begin_of_text|><|system|>\nYou are a helpful assistant.<|end_of_text|><|user|>\nWho?<|end_of_text|><|assistant|>\n"
    );
    // the answer labels start after the longer prompt
    let ex = styled.encode_qa("Who?", "Me.", None).unwrap();
    let prompt_len = styled.encode_prompt("Who?").unwrap().len();
    assert!(ex.labels[..prompt_len].iter().all(|&l| l == -100));
    assert!(ex.labels[prompt_len..].iter().all(|&l| l >= 0));
    // date_string reaches the template
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% if date_string is defined %}[{{ date_string }}]{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    .unwrap();
    let t = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.question_prompt("Q").unwrap(), "Q");
    assert_eq!(
        t.with_prompt_style(style).question_prompt("Q").unwrap(),
        "[10 Apr 2025]You are a helpful assistant.Q"
    );
}
