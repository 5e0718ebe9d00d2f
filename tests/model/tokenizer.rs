//! The tokenizer rebuilt from the SmolLM2 GGUF: reference ids, Unicode round trips, incremental
//! detokenisation, the chat template, and errors for broken folders.

use std::path::Path;

use punica::engine::model::tokenizer::{ChatMessage, Tokenizer, TokenizerError};

use crate::helpers::demo_model_dir;

fn smollm2() -> Tokenizer {
    Tokenizer::from_dir(demo_model_dir()).expect("tokenizer loads")
}

/// Texts that stress byte-level BPE: multi-byte scripts, emoji sequences, combining marks,
/// digits, whitespace runs, control characters.
const SAMPLES: &[&str] = &[
    "The capital of France is",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "emoji: 🦀🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👋🏽 keycap 1️⃣",
    "combining: e\u{301} a\u{308} n\u{303} Z\u{35c}\u{361}a\u{336}l\u{489}g\u{31b}o",
    "digits 1234567890 3.14159 -42 1e-5 ٣٤٥ ０１２",
    "spaces:  two   three\t\ttabs\n\nnewlines\r\n  \n   trailing   ",
    "   leading spaces",
    "control \u{0}\u{1}\u{7f} bidi \u{202e}abc\u{202c} zwsp\u{200b}x",
    "Ελληνικά Русский עברית العربية हिन्दी ไทย",
    "code: fn main() { println!(\"{}\", 1 + 2); } // <|not special|>",
    "",
];

#[test]
fn smollm2_tokenizer_encodes_the_reference_prompt() {
    let tok = smollm2();
    assert_eq!(
        tok.encode("The capital of France is", true)
            .expect("encode"),
        vec![504, 3575, 282, 4649, 314]
    );
    assert_eq!(
        tok.encode("The capital of France is", false)
            .expect("encode"),
        vec![504, 3575, 282, 4649, 314]
    );
    assert_eq!(
        tok.decode(&[7042, 30, 198, 198, 504], false)
            .expect("decode"),
        " Paris.\n\nThe"
    );
}

#[test]
fn smollm2_tokenizer_has_the_special_tokens_of_model_md() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.pad_id(), Some(2));
    assert_eq!(tok.stop_ids(), &[2]);
    assert_eq!(tok.id_to_token(0).as_deref(), Some("<|endoftext|>"));
    for id in 0..17 {
        let text = tok.id_to_token(id).expect("control token");
        assert_eq!(
            tok.encode(&text, false).expect("encode"),
            vec![id],
            "{text}"
        );
        assert_eq!(
            tok.decode(&[id], true).expect("decode"),
            "",
            "{text} is special"
        );
    }
    assert_eq!(
        tok.encode("<|im_start|>user\nHi<|im_end|>", false)
            .expect("encode")[..2],
        [1, 4093]
    );
}

#[test]
fn smollm2_tokenizer_splits_digits_individually() {
    let tok = smollm2();
    let ids = tok.encode("2024", false).expect("encode");
    assert_eq!(ids.len(), 4);
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| tok.decode(&[id], false).expect("decode"))
        .collect();
    assert_eq!(pieces, ["2", "0", "2", "4"]);
}

#[test]
fn smollm2_tokenizer_round_trips_unicode_text() {
    let tok = smollm2();
    for text in SAMPLES {
        let ids = tok.encode(text, false).expect("encode");
        assert_eq!(&tok.decode(&ids, false).expect("decode"), text);
    }
    // Pseudo-random strings over many Unicode blocks.
    let ranges = [
        (0x20u32, 0x7e),
        (0xa0, 0x24f),
        (0x300, 0x36f),
        (0x370, 0x3ff),
        (0x400, 0x4ff),
        (0x590, 0x6ff),
        (0x900, 0x97f),
        (0x3040, 0x30ff),
        (0x4e00, 0x9fff),
        (0xac00, 0xd7a3),
        (0x1f300, 0x1faff),
        (0x10000, 0x1007f),
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..200 {
        let len = (next() % 40) as usize;
        let text: String = (0..len)
            .filter_map(|_| {
                let (lo, hi) = ranges[(next() % ranges.len() as u64) as usize];
                let c = char::from_u32(lo + (next() % u64::from(hi - lo + 1)) as u32)?;
                Some(if next() % 5 == 0 { ' ' } else { c })
            })
            .collect();
        let ids = tok.encode(&text, false).expect("encode");
        assert_eq!(tok.decode(&ids, false).expect("decode"), text);
    }
}

/// Feeds ids one by one; returns the deltas (None for held-back steps) and the final flush.
fn stream(tok: &Tokenizer, ids: &[u32]) -> (Vec<Option<String>>, Option<String>) {
    let mut s = tok.decode_stream(false);
    let deltas = ids.iter().map(|&id| s.push(id).expect("push")).collect();
    (deltas, s.finish().expect("finish"))
}

#[test]
fn decode_stream_deltas_concatenate_to_the_full_decode() {
    let tok = smollm2();
    for text in SAMPLES {
        let ids = tok.encode(text, false).expect("encode");
        let (deltas, tail) = stream(&tok, &ids);
        let joined: String = deltas
            .iter()
            .flatten()
            .chain(tail.iter())
            .cloned()
            .collect();
        assert_eq!(&joined, text);
        assert_eq!(joined, tok.decode(&ids, false).expect("decode"));
        assert!(
            tail.is_none(),
            "complete text leaves nothing to flush for {text:?}"
        );
        for d in deltas.iter().flatten() {
            assert!(
                !d.contains('\u{FFFD}'),
                "partial character leaked in {d:?} of {text:?}"
            );
        }
    }
}

#[test]
fn decode_stream_holds_back_multi_byte_characters_split_across_tokens() {
    let tok = smollm2();
    let text = "🦀 蟹 𝄞 👨‍👩‍👧‍👦";
    let ids = tok.encode(text, false).expect("encode");
    let single_token_pieces = ids
        .iter()
        .filter(|&&id| {
            tok.decode(&[id], false)
                .expect("decode")
                .contains('\u{FFFD}')
        })
        .count();
    assert!(
        single_token_pieces > 0,
        "the sample must contain characters split across tokens"
    );
    let (deltas, _) = stream(&tok, &ids);
    assert!(
        deltas.iter().any(Option::is_none),
        "some step must wait for the rest of a character"
    );
    for d in deltas.iter().flatten() {
        assert!(!d.contains('\u{FFFD}'), "{d:?}");
    }

    // A sequence that ends inside a character: nothing until finish, which matches decode().
    let crab = tok.encode("🦀", false).expect("encode");
    assert!(crab.len() > 1);
    let cut = &crab[..crab.len() - 1];
    let (deltas, tail) = stream(&tok, cut);
    assert!(deltas.iter().all(Option::is_none));
    assert_eq!(tail, Some(tok.decode(cut, false).expect("decode")));
}

#[test]
fn decode_stream_can_skip_special_tokens() {
    let tok = smollm2();
    let mut ids = tok.encode("Hello", false).expect("encode");
    ids.push(2);
    let mut s = tok.decode_stream(true);
    let out: String = ids
        .iter()
        .filter_map(|&id| s.push(id).expect("push"))
        .collect();
    assert_eq!(out, "Hello");
    let mut s = tok.decode_stream(false);
    let out: String = ids
        .iter()
        .filter_map(|&id| s.push(id).expect("push"))
        .collect();
    assert_eq!(out, "Hello<|im_end|>");
}

#[test]
fn smollm2_chat_template_renders_chatml() {
    let tok = smollm2();
    let prompt = tok
        .apply_chat_template(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .expect("render");
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let prompt = tok
        .apply_chat_template(
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
                ChatMessage::new("assistant", "Hello!"),
                ChatMessage::new("user", "Bye"),
            ],
            false,
        )
        .expect("render");
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    );
    let ids = tok.encode(&prompt, false).expect("encode");
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 4);
    let chat_ids = tok
        .encode_chat(&[ChatMessage::new("user", "Hi")], true)
        .expect("encode chat");
    assert_eq!(chat_ids.first(), Some(&1));
    assert_eq!(
        chat_ids.iter().filter(|&&id| id == 1).count(),
        3,
        "three turns opened"
    );
    assert_eq!(
        tok.decode(&chat_ids, false).expect("decode"),
        tok.apply_chat_template(&[ChatMessage::new("user", "Hi")], true)
            .expect("render")
    );
}

#[test]
fn tokenizer_and_decode_stream_can_move_between_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<punica::engine::model::tokenizer::DecodeStream>();
}

/// A folder with SmolLM2's tokenizer.json and the given tokenizer_config.json.
fn folder_with_config(config: &serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        demo_model_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .expect("copy tokenizer.json");
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).expect("write");
    dir
}

#[test]
fn chat_template_supports_python_methods_raise_exception_and_special_token_variables() {
    let template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}\
        {{ bos_token }}{% for m in messages %}[{{ m['role'].upper() }}] {{ m['content'].strip() }}{{ eos_token }}\n{% endfor %}\
        {% if add_generation_prompt %}[ASSISTANT]{% endif %}";
    let dir = folder_with_config(&serde_json::json!({
        "bos_token": {"content": "<|im_start|>", "special": true},
        "eos_token": "<|im_end|>",
        "chat_template": template,
    }));
    let tok = Tokenizer::from_dir(dir.path()).expect("loads");
    let out = tok
        .apply_chat_template(&[ChatMessage::new("user", "  padded  \n")], true)
        .expect("render");
    assert_eq!(out, "<|im_start|>[USER] padded<|im_end|>\n[ASSISTANT]");
    let err = tok
        .apply_chat_template(&[ChatMessage::new("assistant", "x")], true)
        .expect_err("raise_exception");
    assert!(
        matches!(&err, TokenizerError::Template { reason } if reason == "first message must be from the user"),
        "{err}"
    );
}

#[test]
fn tokenizer_reads_stop_ids_from_generation_config() {
    let dir = folder_with_config(&serde_json::json!({"eos_token": "<|endoftext|>"}));
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [0, 5]}"#,
    )
    .expect("write");
    let tok = Tokenizer::from_dir(dir.path()).expect("loads");
    assert_eq!(tok.eos_id(), Some(0));
    // 0 and 5 from the configs, 2 because <|im_end|> is a special end-of-turn token.
    assert_eq!(tok.stop_ids(), &[0, 2, 5]);
    assert!(!tok.has_chat_template());
    assert!(matches!(
        tok.apply_chat_template(&[ChatMessage::new("user", "x")], true),
        Err(TokenizerError::NoChatTemplate)
    ));
}

#[test]
fn tokenizer_errors_name_the_broken_file() {
    let empty = tempfile::tempdir().expect("tempdir");
    let err = Tokenizer::from_dir(empty.path()).expect_err("no files");
    assert!(
        matches!(&err, TokenizerError::MissingFile { path } if path.ends_with("tokenizer.json")),
        "{err}"
    );

    let dir = folder_with_config(&serde_json::json!({}));
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).expect("rm");
    let err = Tokenizer::from_dir(dir.path()).expect_err("no config");
    assert!(
        matches!(&err, TokenizerError::MissingFile { path } if path.ends_with("tokenizer_config.json")),
        "{err}"
    );

    std::fs::write(dir.path().join("tokenizer_config.json"), "{ not json").expect("write");
    let err = Tokenizer::from_dir(dir.path()).expect_err("bad json");
    assert!(
        matches!(&err, TokenizerError::Malformed { path, .. } if path.ends_with("tokenizer_config.json")),
        "{err}"
    );

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|nope|>"}"#,
    )
    .expect("write");
    let err = Tokenizer::from_dir(dir.path()).expect_err("unknown eos");
    assert!(
        matches!(&err, TokenizerError::UnknownSpecialToken { field: "eos_token", token } if token == "<|nope|>"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{% for %}"}"#,
    )
    .expect("write");
    let err = Tokenizer::from_dir(dir.path()).expect_err("bad template");
    assert!(matches!(&err, TokenizerError::Template { .. }), "{err}");

    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").expect("write");
    std::fs::write(dir.path().join("tokenizer.json"), r#"{"model": 3}"#).expect("write");
    let err = Tokenizer::from_dir(dir.path()).expect_err("bad tokenizer.json");
    assert!(
        matches!(&err, TokenizerError::Malformed { path, .. } if path.ends_with("tokenizer.json")),
        "{err}"
    );
    assert!(Path::new(dir.path()).exists());
}

#[test]
fn chat_template_offers_strftime_now_and_named_template_lists() {
    let dir = folder_with_config(&serde_json::json!({
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ strftime_now('%Y-%m-%d %b %%') }}|{{ messages | length }}"},
        ],
    }));
    let tok = Tokenizer::from_dir(dir.path()).expect("loads");
    let before = time::OffsetDateTime::now_utc();
    let out = tok
        .apply_chat_template(&[ChatMessage::new("user", "x")], false)
        .expect("render");
    let after = time::OffsetDateTime::now_utc();
    let expect = |t: time::OffsetDateTime| {
        format!(
            "{}-{:02}-{:02} {} %|1",
            t.year(),
            u8::from(t.month()),
            t.day(),
            &t.month().to_string()[..3]
        )
    };
    assert!(out == expect(before) || out == expect(after), "{out}");

    let bad = folder_with_config(&serde_json::json!({"chat_template": "{{ strftime_now('%Q') }}"}));
    let tok = Tokenizer::from_dir(bad.path()).expect("loads");
    let err = tok
        .apply_chat_template(&[], false)
        .expect_err("unsupported directive");
    assert!(err.to_string().contains("%Q"), "{err}");
}
