//! The text side of a model folder: tokenizer.json through the `tokenizers` crate, the special
//! and stop token ids from tokenizer_config.json and generation_config.json, incremental
//! detokenisation that never splits a UTF-8 character, and the chat template rendered with
//! minijinja the way Hugging Face's `apply_chat_template` renders it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::{Environment, Error as JinjaError, ErrorKind as JinjaErrorKind, Value};
use serde_json::Value as Json;

/// Everything that can go wrong reading a tokenizer or using it.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required file is absent from the model folder.
    #[error("tokenizer file {path} is missing")]
    MissingFile {
        /// The file.
        path: PathBuf,
    },
    /// A file exists but cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not what a Hugging Face tokenizer folder holds.
    #[error("malformed {path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A special token named in tokenizer_config.json is not in the vocabulary.
    #[error("{field} {token:?} in tokenizer_config.json is not in the vocabulary")]
    UnknownSpecialToken {
        /// Which field (`bos_token`, ...).
        field: &'static str,
        /// Its text.
        token: String,
    },
    /// Encoding failed inside `tokenizers`.
    #[error("encoding failed: {reason}")]
    Encode {
        /// Why.
        reason: String,
    },
    /// Decoding failed inside `tokenizers` (for instance an id outside the vocabulary).
    #[error("decoding failed: {reason}")]
    Decode {
        /// Why.
        reason: String,
    },
    /// The model has no chat template.
    #[error("the model folder has no chat_template in tokenizer_config.json")]
    NoChatTemplate,
    /// The chat template does not compile or fails while rendering (including its own
    /// `raise_exception` calls, whose message is kept).
    #[error("chat template: {reason}")]
    Template {
        /// Why.
        reason: String,
    },
}

/// One chat message for the template.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's tokenizer with the settings of its folder.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    pad_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    stop_ids: Vec<u32>,
    template: Option<Arc<Environment<'static>>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad_id", &self.pad_id)
            .field("stop_ids", &self.stop_ids)
            .field("chat_template", &self.template.is_some())
            .finish()
    }
}

/// End-of-turn markers of common chat formats; when the vocabulary has one as a special token it
/// also stops generation, because chat fine-tunes end their answers with it even where the
/// configured eos is another token.
const END_OF_TURN_TOKENS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
];

impl Tokenizer {
    /// Loads tokenizer.json, tokenizer_config.json and (if present) generation_config.json from
    /// a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tok_path = dir.join("tokenizer.json");
        let bytes = read(&tok_path)?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Malformed {
                path: tok_path.clone(),
                reason: e.to_string(),
            })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config = read_json(&cfg_path)?;
        let gen_path = dir.join("generation_config.json");
        let generation = match std::fs::metadata(&gen_path) {
            Ok(_) => Some(read_json(&gen_path)?),
            Err(_) => None,
        };
        Self::from_parts(inner, &config, generation.as_ref(), &cfg_path)
    }

    fn from_parts(
        inner: tokenizers::Tokenizer,
        config: &Json,
        generation: Option<&Json>,
        cfg_path: &Path,
    ) -> Result<Self, TokenizerError> {
        let malformed = |reason: String| TokenizerError::Malformed {
            path: cfg_path.to_path_buf(),
            reason,
        };
        if !config.is_object() {
            return Err(malformed("not a JSON object".into()));
        }
        let special = |field: &'static str| -> Result<Option<(u32, String)>, TokenizerError> {
            // A token is either a plain string or an AddedToken object with `content`.
            let text = match config.get(field) {
                None | Some(Json::Null) => return Ok(None),
                Some(Json::String(s)) => s.clone(),
                Some(Json::Object(o)) => match o.get("content") {
                    Some(Json::String(s)) => s.clone(),
                    _ => return Err(malformed(format!("{field} has no string content"))),
                },
                Some(other) => return Err(malformed(format!("{field} is {other}"))),
            };
            match inner.token_to_id(&text) {
                Some(id) => Ok(Some((id, text))),
                None => Err(TokenizerError::UnknownSpecialToken { field, token: text }),
            }
        };
        let bos = special("bos_token")?;
        let eos = special("eos_token")?;
        let pad_id = special("pad_token")?.map(|(id, _)| id);
        let flag = |field: &str| match config.get(field) {
            None | Some(Json::Null) => Ok(false),
            Some(Json::Bool(b)) => Ok(*b),
            Some(other) => Err(malformed(format!("{field} is {other}, expected a boolean"))),
        };
        let add_bos = flag("add_bos_token")?;
        let add_eos = flag("add_eos_token")?;

        let mut stop_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
        if let Some(generation) = generation {
            match generation.get("eos_token_id") {
                None | Some(Json::Null) => {}
                Some(v) => {
                    let ids = match v {
                        Json::Array(a) => a.iter().map(Json::as_u64).collect::<Option<Vec<_>>>(),
                        one => one.as_u64().map(|id| vec![id]),
                    };
                    let ids = ids.ok_or_else(|| TokenizerError::Malformed {
                        path: cfg_path.with_file_name("generation_config.json"),
                        reason: format!("eos_token_id is {v}, expected an id or a list of ids"),
                    })?;
                    stop_ids.extend(ids.into_iter().filter_map(|id| u32::try_from(id).ok()));
                }
            }
        }
        let added = inner.get_added_tokens_decoder();
        for marker in END_OF_TURN_TOKENS {
            if let Some(id) = inner.token_to_id(marker)
                && added.get(&id).is_some_and(|t| t.special)
            {
                stop_ids.push(id);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();

        let template = match config.get("chat_template") {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            // Newer folders may carry several named templates; "default" is the chat one.
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_owned),
            Some(other) => {
                return Err(malformed(format!(
                    "chat_template is {other}, expected a string"
                )));
            }
        };
        let template = template.map(compile_template).transpose()?.map(Arc::new);

        Ok(Tokenizer {
            inner: Arc::new(inner),
            bos,
            eos,
            pad_id,
            add_bos,
            add_eos,
            stop_ids,
            template,
        })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Beginning-of-sequence id, if the folder names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|(id, _)| *id)
    }

    /// End-of-sequence id, if the folder names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|(id, _)| *id)
    }

    /// Padding id, if the folder names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Ids that end generation: eos, generation_config's eos ids, and end-of-turn markers.
    /// Sorted, without duplicates.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The text of a token id (added tokens included).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token text (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes `text`. With `add_special_tokens` the tokenizer's post-processor runs and the
    /// `add_bos_token` / `add_eos_token` settings of tokenizer_config.json are honoured, as in
    /// Hugging Face's `tokenizer(text)`; without, the text is encoded as is (what a rendered
    /// chat template wants, since it already carries its special tokens).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| TokenizerError::Encode {
                    reason: e.to_string(),
                })?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens {
            if let (true, Some(bos)) = (self.add_bos, self.bos_id())
                && ids.first() != Some(&bos)
            {
                ids.insert(0, bos);
            }
            if let (true, Some(eos)) = (self.add_eos, self.eos_id())
                && ids.last() != Some(&eos)
            {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text, optionally leaving out special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode {
                reason: e.to_string(),
            })
    }

    /// A fresh incremental detokenizer for one generated sequence.
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream {
        DecodeStream {
            tokenizer: Arc::clone(&self.inner),
            skip_special_tokens,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    /// Whether the folder has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders the chat template over `messages`, as Hugging Face's
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let env = self
            .template
            .as_ref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        let template = env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from(BTreeMap::from([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ]))
            })
            .collect();
        let token_text = |t: &Option<(u32, String)>| {
            t.as_ref()
                .map(|(_, s)| Value::from(s.as_str()))
                .unwrap_or(Value::from(""))
        };
        let ctx = Value::from(BTreeMap::from([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", token_text(&self.bos)),
            ("eos_token", token_text(&self.eos)),
        ]));
        template.render(ctx).map_err(template_error)
    }
}

impl Tokenizer {
    /// Renders the chat template and encodes the result without adding special tokens again
    /// (the template already wrote them), as `apply_chat_template(tokenize=True)` does.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// Compiles a chat template with the environment Hugging Face uses: blocks trimmed, a
/// `raise_exception` function, Python string/dict/list methods (`.strip()`, `.items()`, ...),
/// and `strftime_now`.
fn compile_template(source: String) -> Result<Environment<'static>, TokenizerError> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(template_error)?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(JinjaErrorKind::InvalidOperation, message))
        },
    );
    env.add_function(
        "strftime_now",
        |format: String| -> Result<Value, JinjaError> {
            strftime(&format, time::OffsetDateTime::now_utc()).map(Value::from)
        },
    );
    env.add_template_owned(TEMPLATE_NAME, source)
        .map_err(template_error)?;
    Ok(env)
}

fn template_error(e: JinjaError) -> TokenizerError {
    // `raise_exception` messages are the template author's words: show them plainly.
    let reason = match (e.kind(), e.detail()) {
        (JinjaErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => e.to_string(),
    };
    TokenizerError::Template { reason }
}

/// The subset of C `strftime` that chat templates use for "today's date" lines.
fn strftime(format: &str, now: time::OffsetDateTime) -> Result<String, JinjaError> {
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month = now.month();
        match chars.next() {
            Some('d') => out.push_str(&format!("{:02}", now.day())),
            Some('m') => out.push_str(&format!("{:02}", u8::from(month))),
            Some('Y') => out.push_str(&now.year().to_string()),
            Some('y') => out.push_str(&format!("{:02}", now.year().rem_euclid(100))),
            Some('B') => out.push_str(&month.to_string()),
            Some('b') => out.push_str(&month.to_string()[..3]),
            Some('A') => out.push_str(&now.weekday().to_string()),
            Some('a') => out.push_str(&now.weekday().to_string()[..3]),
            Some('H') => out.push_str(&format!("{:02}", now.hour())),
            Some('M') => out.push_str(&format!("{:02}", now.minute())),
            Some('S') => out.push_str(&format!("{:02}", now.second())),
            Some('%') => out.push('%'),
            other => {
                return Err(JinjaError::new(
                    JinjaErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{}",
                        other.unwrap_or(' ')
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Incremental detokenisation of one sequence: push ids, get text deltas.
///
/// A delta is only released once the text decoded so far ends in a complete character, so a
/// character spread over several byte-level tokens (CJK, emoji) is never split and no
/// replacement character leaks out mid-stream. The concatenation of all deltas plus
/// [`DecodeStream::finish`] equals the decode of all ids at once. Only a short window of ids is
/// kept, so each step costs the same however long the sequence grows.
#[derive(Clone)]
pub struct DecodeStream {
    tokenizer: Arc<tokenizers::Tokenizer>,
    skip_special_tokens: bool,
    /// Ids of the current window: some already-emitted context, then pending ids.
    ids: Vec<u32>,
    /// The text the window's context ids decode to (already emitted).
    prefix: String,
    /// How many of `ids` are context.
    prefix_index: usize,
}

impl std::fmt::Debug for DecodeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeStream")
            .field("ids", &self.ids)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl DecodeStream {
    /// Adds one generated id; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let text = self.decode_window()?;
        if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let delta = self.delta(text)?;
        // Slide the window: the ids just emitted become the context of the next step, so
        // decoders that look at neighbours (spaces, byte merges) see the same surroundings.
        self.ids.drain(..self.prefix_index);
        self.prefix_index = self.ids.len();
        self.prefix = self.decode_window()?;
        Ok(Some(delta))
    }

    /// Releases whatever is still held back (an incomplete character at the very end decodes
    /// to U+FFFD, as the full decode does). Call once when the sequence ends.
    pub fn finish(&mut self) -> Result<Option<String>, TokenizerError> {
        let text = self.decode_window()?;
        if text.len() <= self.prefix.len() {
            return Ok(None);
        }
        let delta = self.delta(text)?;
        self.ids.clear();
        self.prefix.clear();
        self.prefix_index = 0;
        Ok(Some(delta))
    }

    fn decode_window(&self) -> Result<String, TokenizerError> {
        self.tokenizer
            .decode(&self.ids, self.skip_special_tokens)
            .map_err(|e| TokenizerError::Decode {
                reason: e.to_string(),
            })
    }

    fn delta(&self, text: String) -> Result<String, TokenizerError> {
        match text.strip_prefix(self.prefix.as_str()) {
            Some(rest) => Ok(rest.to_owned()),
            None => Err(TokenizerError::Decode {
                reason: format!(
                    "the decoder rewrote already emitted text {:?} as {text:?}",
                    self.prefix
                ),
            }),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TokenizerError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn read_json(path: &Path) -> Result<Json, TokenizerError> {
    let bytes = read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| TokenizerError::Malformed {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
