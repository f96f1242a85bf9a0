//! Train a small byte-level BPE tokenizer (GPT-2 style) on JSONL example files, and write it as
//! a Hugging Face model directory's `tokenizer.json` + `tokenizer_config.json` (with a
//! "Question: …\nAnswer: " chat template) that [`crate::tokenizer::ChatTokenizer`] and
//! transformers' `PreTrainedTokenizerFast` both load.
//!
//! Training is deterministic: the `tokenizers` BPE trainer keeps its counts in hash maps, but
//! the alphabet is sorted, every merge is chosen by (count, pair ids) with ties broken by the
//! pair ids, and new ids are assigned in merge order, so the result does not depend on hash
//! order; the serialization writes the vocabulary by id and the merges by rank.
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer};

use super::ensure_dir;
use crate::error::{Error, Result};
use crate::model::weights::write_atomic;
use crate::tokenizer::{TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};

/// Beginning-of-sequence token (id 0).
pub const BOS_TOKEN: &str = "<|bos|>";
/// End-of-sequence token (id 1).
pub const EOS_TOKEN: &str = "<|eos|>";
/// Padding token (id 2).
pub const PAD_TOKEN: &str = "<|pad|>";
/// `model_max_length` in tokenizer_config.json.
pub const MODEL_MAX_LENGTH: usize = 512;
/// The byte-level alphabet (256) plus the three special tokens: the smallest vocabulary.
pub const MIN_VOCAB_SIZE: usize = 256 + 3;

/// Renders `<|bos|>`, then a system message (if any) on its own line, then
/// `Question: {content}\n` for a user message, `Answer: {content}<|eos|>\n` for an assistant
/// message, and `Answer: ` as the generation prompt. The trailing space of the prompt is its own
/// token, so `encode_qa` gives the prompt, then the answer tokenized on its own, then `<|eos|>`,
/// and a greedy generation decodes to the answer text without a leading space. It matches the
/// fallback prompt `question_prompt` uses for models without a template (plus the BOS).
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}{% elif message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}{{ 'Answer: ' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Answer: ' }}{% endif %}";

/// The string fields (or lists of strings) of a record that are fed to the trainer, in order.
pub const TEXT_FIELDS: &[&str] = &[
    "text",
    "question",
    "answer",
    "paraphrased_question",
    "paraphrased_answer",
    "perturbed_answer",
    "choices",
];

#[derive(Serialize)]
struct TokenizerConfig<'a> {
    bos_token: &'a str,
    eos_token: &'a str,
    pad_token: &'a str,
    model_max_length: usize,
    tokenizer_class: &'a str,
    clean_up_tokenization_spaces: bool,
    chat_template: &'a str,
}

/// The strings of [`TEXT_FIELDS`] in every record of `files`, in file, record and field order.
pub fn training_texts(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    for path in files {
        for record in crate::data::read_objects(path)? {
            for field in TEXT_FIELDS {
                match record.get(*field) {
                    Some(Value::String(s)) => texts.push(s.clone()),
                    Some(Value::Array(items)) => {
                        texts.extend(items.iter().filter_map(Value::as_str).map(str::to_string))
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(texts)
}

/// Train the tokenizer in memory on `texts`. `what` names the input in errors.
pub fn train_on_texts(texts: &[String], vocab_size: usize, what: &Path) -> Result<Tokenizer> {
    let err = |msg: String| Error::Tokenizer {
        path: what.to_path_buf(),
        msg,
    };
    if vocab_size < MIN_VOCAB_SIZE {
        return Err(Error::InvalidArgument(format!(
            "vocab_size {vocab_size} is below {MIN_VOCAB_SIZE} (256 byte symbols + 3 special tokens)"
        )));
    }
    if texts.is_empty() {
        return Err(err(
            "no training text (no string fields among the inputs)".into()
        ));
    }
    let specials: Vec<AddedToken> = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);

    let byte_level = ByteLevel::default()
        .add_prefix_space(false)
        .trim_offsets(true);
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)));
    tokenizer.with_post_processor(Some(PostProcessorWrapper::ByteLevel(byte_level)));
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| err(format!("training failed: {e}")))?;
    for (id, tok) in [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN].iter().enumerate() {
        if tokenizer.token_to_id(tok) != Some(id as u32) {
            return Err(err(format!("special token {tok} did not get id {id}")));
        }
    }
    Ok(tokenizer)
}

/// The `tokenizer_config.json` text.
pub fn tokenizer_config_json() -> String {
    let config = TokenizerConfig {
        bos_token: BOS_TOKEN,
        eos_token: EOS_TOKEN,
        pad_token: PAD_TOKEN,
        model_max_length: MODEL_MAX_LENGTH,
        tokenizer_class: "PreTrainedTokenizerFast",
        clean_up_tokenization_spaces: false,
        chat_template: CHAT_TEMPLATE,
    };
    let mut s = serde_json::to_string_pretty(&config).expect("serializable config");
    s.push('\n');
    s
}

/// Train a byte-level BPE tokenizer on the `text`/`question`/`answer`/… string fields of the
/// given JSONL files and write tokenizer.json + tokenizer_config.json into `out_dir`.
pub fn train_tokenizer(files: &[PathBuf], vocab_size: usize, out_dir: &Path) -> Result<()> {
    if files.is_empty() {
        return Err(Error::InvalidArgument(
            "train_tokenizer needs at least one data file".into(),
        ));
    }
    let texts = training_texts(files)?;
    let tokenizer = train_on_texts(&texts, vocab_size, &files[0])?;
    ensure_dir(out_dir)?;
    let tokenizer_path = out_dir.join(TOKENIZER_FILE);
    let json = tokenizer.to_string(false).map_err(|e| Error::Tokenizer {
        path: tokenizer_path.clone(),
        msg: format!("cannot serialize: {e}"),
    })?;
    write_atomic(&tokenizer_path, json.as_bytes())?;
    write_atomic(
        &out_dir.join(TOKENIZER_CONFIG_FILE),
        tokenizer_config_json().as_bytes(),
    )?;
    Ok(())
}
