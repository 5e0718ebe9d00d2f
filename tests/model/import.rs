//! `model import-gguf`: the real SmolLM2 GGUF and small hand-built Llama GGUFs.

use std::path::Path;
use std::process::Command;

use memmap2::Mmap;
use punica::engine::model::gguf::{
    GgmlType, GgufError, GgufFile, ImportDtype, ImportError, import_gguf, unpermute_rows,
};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

use crate::helpers::{GgufWriter, Kv, demo_gguf_path, demo_model_dir, tiny_tokenizer_kvs};

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read json")).expect("parse json")
}

fn map(path: &Path) -> Mmap {
    let file = std::fs::File::open(path).expect("open");
    // SAFETY: test files are written once before being mapped and never modified afterwards.
    unsafe { Mmap::map(&file) }.expect("mmap")
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn smollm2_import_writes_the_config_of_model_md() {
    let cfg = read_json(&demo_model_dir().join("config.json"));
    let expect = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": true,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    for (key, value) in expect.as_object().expect("object") {
        assert_eq!(&cfg[key], value, "config.json {key}");
    }
    let generation = read_json(&demo_model_dir().join("generation_config.json"));
    assert_eq!(generation["eos_token_id"], json!(2));
    assert_eq!(generation["bos_token_id"], json!(1));
    let tok_cfg = read_json(&demo_model_dir().join("tokenizer_config.json"));
    assert_eq!(tok_cfg["bos_token"], "<|im_start|>");
    assert_eq!(tok_cfg["eos_token"], "<|im_end|>");
    assert_eq!(tok_cfg["pad_token"], "<|im_end|>");
    assert_eq!(tok_cfg["add_bos_token"], false);
    assert!(
        tok_cfg["chat_template"]
            .as_str()
            .expect("template")
            .contains("<|im_start|>")
    );
}

#[test]
fn smollm2_safetensors_have_hugging_face_names_shapes_and_f32_dtype() {
    let bytes = map(&demo_model_dir().join("model.safetensors"));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    assert_eq!(
        st.len(),
        2 + 30 * 9,
        "embed + norm + 9 per layer, no lm_head (tied)"
    );
    let shape = |name: &str| {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.shape().to_vec()
    };
    assert_eq!(shape("model.embed_tokens.weight"), [49152, 576]);
    assert_eq!(shape("model.norm.weight"), [576]);
    for l in [0, 29] {
        let p = format!("model.layers.{l}");
        assert_eq!(shape(&format!("{p}.self_attn.q_proj.weight")), [576, 576]);
        assert_eq!(shape(&format!("{p}.self_attn.k_proj.weight")), [192, 576]);
        assert_eq!(shape(&format!("{p}.self_attn.v_proj.weight")), [192, 576]);
        assert_eq!(shape(&format!("{p}.self_attn.o_proj.weight")), [576, 576]);
        assert_eq!(shape(&format!("{p}.mlp.gate_proj.weight")), [1536, 576]);
        assert_eq!(shape(&format!("{p}.mlp.up_proj.weight")), [1536, 576]);
        assert_eq!(shape(&format!("{p}.mlp.down_proj.weight")), [576, 1536]);
        assert_eq!(shape(&format!("{p}.input_layernorm.weight")), [576]);
        assert_eq!(
            shape(&format!("{p}.post_attention_layernorm.weight")),
            [576]
        );
    }
    assert!(st.tensor("lm_head.weight").is_err());
    let (_, meta) = SafeTensors::read_metadata(&bytes).expect("metadata");
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt"),
        "transformers wants format=pt"
    );
}

#[test]
fn smollm2_gguf_has_the_tensor_types_of_model_md() {
    let file = GgufFile::open(&demo_gguf_path()).expect("open GGUF");
    assert_eq!(file.header.version, 3);
    let count = |ty| {
        file.header
            .tensors
            .iter()
            .filter(|t| t.ggml_type == ty)
            .count()
    };
    assert_eq!(count(GgmlType::Q4_1), 210);
    assert_eq!(count(GgmlType::Q8_0), 1);
    assert_eq!(count(GgmlType::F32), 61);
    assert_eq!(
        file.header.tensor("token_embd.weight").map(|t| t.ggml_type),
        Some(GgmlType::Q8_0)
    );
}

#[test]
fn smollm2_q_and_k_are_stored_unpermuted_and_v_as_is() {
    let file = GgufFile::open(&demo_gguf_path()).expect("open GGUF");
    let bytes = map(&demo_model_dir().join("model.safetensors"));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    for (gguf, hf, n_head, rows) in [
        (
            "blk.3.attn_q.weight",
            "model.layers.3.self_attn.q_proj.weight",
            9,
            576,
        ),
        (
            "blk.3.attn_k.weight",
            "model.layers.3.self_attn.k_proj.weight",
            3,
            192,
        ),
        (
            "blk.3.attn_v.weight",
            "model.layers.3.self_attn.v_proj.weight",
            0,
            192,
        ),
    ] {
        let info = file.header.tensor(gguf).expect("tensor");
        let raw = file.dequantize(info).expect("dequantize");
        let expected = if n_head == 0 {
            raw.clone()
        } else {
            unpermute_rows(&raw, rows, 576, n_head).expect("shape")
        };
        let got = f32s(st.tensor(hf).expect("tensor").data());
        assert_eq!(got, expected, "{hf}");
        if n_head != 0 {
            assert_ne!(got, raw, "{hf} must differ from llama.cpp's row order");
        }
    }
}

const HID: usize = 8;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 4;
const INTER: usize = 16;
const LAYERS: usize = 2;
const VOCAB: usize = 2 + 256 + 3;

/// Deterministic distinct values so every tensor's placement can be checked.
fn values(seed: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| (seed * 1000 + i) as f32 * 1e-3).collect()
}

/// A two-layer Llama with GQA in GGUF form, all F32, optionally untied.
fn tiny_llama(untied: bool) -> GgufWriter {
    let mut w = tiny_tokenizer_kvs(GgufWriter::default())
        .kv("general.architecture", Kv::Str("llama".into()))
        .kv("llama.block_count", Kv::U32(LAYERS as u32))
        .kv("llama.context_length", Kv::U32(128))
        .kv("llama.embedding_length", Kv::U32(HID as u32))
        .kv("llama.feed_forward_length", Kv::U32(INTER as u32))
        .kv("llama.attention.head_count", Kv::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", Kv::U32(KV_HEADS as u32))
        .kv("llama.rope.freq_base", Kv::F32(500000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Kv::F32(1e-6))
        .f32_tensor(
            "token_embd.weight",
            &[HID as u64, VOCAB as u64],
            &values(1, HID * VOCAB),
        )
        .f32_tensor("output_norm.weight", &[HID as u64], &values(2, HID));
    if untied {
        w = w.f32_tensor(
            "output.weight",
            &[HID as u64, VOCAB as u64],
            &values(3, HID * VOCAB),
        );
    }
    for l in 0..LAYERS {
        let s = 10 + l * 10;
        let (h, q, kv, i) = (
            HID as u64,
            (HEADS * HEAD_DIM) as u64,
            (KV_HEADS * HEAD_DIM) as u64,
            INTER as u64,
        );
        w = w
            .f32_tensor(&format!("blk.{l}.attn_norm.weight"), &[h], &values(s, HID))
            .f32_tensor(
                &format!("blk.{l}.attn_q.weight"),
                &[h, q],
                &values(s + 1, HID * HEADS * HEAD_DIM),
            )
            .f32_tensor(
                &format!("blk.{l}.attn_k.weight"),
                &[h, kv],
                &values(s + 2, HID * KV_HEADS * HEAD_DIM),
            )
            .f32_tensor(
                &format!("blk.{l}.attn_v.weight"),
                &[h, kv],
                &values(s + 3, HID * KV_HEADS * HEAD_DIM),
            )
            .f32_tensor(
                &format!("blk.{l}.attn_output.weight"),
                &[q, h],
                &values(s + 4, HID * HEADS * HEAD_DIM),
            )
            .f32_tensor(
                &format!("blk.{l}.ffn_norm.weight"),
                &[h],
                &values(s + 5, HID),
            )
            .f32_tensor(
                &format!("blk.{l}.ffn_gate.weight"),
                &[h, i],
                &values(s + 6, HID * INTER),
            )
            .f32_tensor(
                &format!("blk.{l}.ffn_up.weight"),
                &[h, i],
                &values(s + 7, HID * INTER),
            )
            .f32_tensor(
                &format!("blk.{l}.ffn_down.weight"),
                &[i, h],
                &values(s + 8, HID * INTER),
            );
    }
    w
}

#[test]
fn tiny_llama_import_maps_every_tensor_to_its_hugging_face_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("tiny.gguf");
    tiny_llama(true).write(&gguf);
    let out = dir.path().join("out");
    let summary = import_gguf(&gguf, &out, ImportDtype::F32).expect("import");
    assert_eq!(summary.n_tensors, 3 + LAYERS * 9);
    assert!(!summary.params.tie_word_embeddings);

    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["rope_theta"], 500000.0);
    assert_eq!(cfg["rms_norm_eps"], 1e-6);
    assert_eq!(cfg["num_key_value_heads"], 1);
    assert_eq!(cfg["head_dim"], 4);
    assert_eq!(cfg["vocab_size"], VOCAB);
    assert_eq!(cfg["bos_token_id"], 0);
    assert_eq!(cfg["eos_token_id"], 1);

    let bytes = map(&out.join("model.safetensors"));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let get = |name: &str| {
        f32s(
            st.tensor(name)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .data(),
        )
    };
    assert_eq!(get("model.embed_tokens.weight"), values(1, HID * VOCAB));
    assert_eq!(get("model.norm.weight"), values(2, HID));
    assert_eq!(get("lm_head.weight"), values(3, HID * VOCAB));
    for l in 0..LAYERS {
        let s = 10 + l * 10;
        let p = format!("model.layers.{l}");
        assert_eq!(get(&format!("{p}.input_layernorm.weight")), values(s, HID));
        // Q rows (head 0): llama.cpp order 0,1,2,3 holds HF rows 0,2,1,3.
        let q = get(&format!("{p}.self_attn.q_proj.weight"));
        let raw_q = values(s + 1, HID * HEADS * HEAD_DIM);
        for (hf_row, gguf_row) in [
            (0, 0),
            (1, 2),
            (2, 1),
            (3, 3),
            (4, 4),
            (5, 6),
            (6, 5),
            (7, 7),
        ] {
            assert_eq!(
                q[hf_row * HID..(hf_row + 1) * HID],
                raw_q[gguf_row * HID..(gguf_row + 1) * HID]
            );
        }
        let k = get(&format!("{p}.self_attn.k_proj.weight"));
        let raw_k = values(s + 2, HID * HEAD_DIM);
        assert_eq!(k[HID..2 * HID], raw_k[2 * HID..3 * HID]);
        assert_eq!(
            get(&format!("{p}.self_attn.v_proj.weight")),
            values(s + 3, HID * HEAD_DIM)
        );
        assert_eq!(
            st.tensor(&format!("{p}.self_attn.o_proj.weight"))
                .expect("o")
                .shape(),
            [HID, HEADS * HEAD_DIM]
        );
        assert_eq!(
            get(&format!("{p}.post_attention_layernorm.weight")),
            values(s + 5, HID)
        );
        assert_eq!(
            get(&format!("{p}.mlp.gate_proj.weight")),
            values(s + 6, HID * INTER)
        );
        assert_eq!(
            st.tensor(&format!("{p}.mlp.up_proj.weight"))
                .expect("up")
                .shape(),
            [INTER, HID]
        );
        assert_eq!(
            st.tensor(&format!("{p}.mlp.down_proj.weight"))
                .expect("down")
                .shape(),
            [HID, INTER]
        );
    }
    let tok = punica::engine::model::tokenizer::Tokenizer::from_dir(&out).expect("tokenizer loads");
    assert_eq!(tok.encode(" the", false).expect("encode"), vec![260]);
}

#[test]
fn import_converts_to_f16_and_bf16() {
    for (dtype, st_dtype, torch) in [
        (ImportDtype::F16, Dtype::F16, "float16"),
        (ImportDtype::Bf16, Dtype::BF16, "bfloat16"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let gguf = dir.path().join("tiny.gguf");
        tiny_llama(false).write(&gguf);
        let out = dir.path().join("out");
        import_gguf(&gguf, &out, dtype).expect("import");
        assert_eq!(read_json(&out.join("config.json"))["torch_dtype"], torch);
        let bytes = map(&out.join("model.safetensors"));
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        assert!(
            st.tensor("lm_head.weight").is_err(),
            "tied model has no lm_head"
        );
        let norm = st.tensor("model.norm.weight").expect("norm");
        assert_eq!(norm.dtype(), st_dtype);
        let got: Vec<f32> = norm
            .data()
            .chunks_exact(2)
            .map(|c| match dtype {
                ImportDtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                _ => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            })
            .collect();
        for (g, want) in got.iter().zip(values(2, HID)) {
            assert!((g - want).abs() <= want.abs() * 1e-2, "{g} vs {want}");
        }
    }
}

#[test]
fn failed_import_leaves_no_output_folder_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("tiny.gguf");
    let mut w = tiny_llama(false);
    // blk.1.ffn_down stored as Q4_K: parses, but cannot be dequantised.
    let pos = w
        .tensors
        .iter()
        .position(|t| t.0 == "blk.1.ffn_down.weight")
        .expect("tensor");
    w.tensors[pos] = (
        "blk.1.ffn_down.weight".into(),
        vec![256, 8],
        12,
        vec![0; 8 * 144],
    );
    w.write(&gguf);
    let out = dir.path().join("out");
    let err = import_gguf(&gguf, &out, ImportDtype::F32).expect_err("import fails");
    assert!(
        matches!(&err, ImportError::ShapeMismatch { name, .. } if name == "blk.1.ffn_down.weight"),
        "{err}"
    );

    // Same tensor with the right shape: the failure comes while writing, after other files.
    let mut w = tiny_llama(false);
    w.kvs.retain(|(k, _)| k != "llama.feed_forward_length");
    w = w.kv("llama.feed_forward_length", Kv::U32(256));
    for t in &mut w.tensors {
        if t.0.contains("ffn_gate") || t.0.contains("ffn_up") {
            *t = (
                t.0.clone(),
                vec![HID as u64, 256],
                0,
                vec![0; HID * 256 * 4],
            );
        }
        if t.0.contains("ffn_down") {
            *t = (t.0.clone(), vec![256, HID as u64], 12, vec![0; HID * 144]);
        }
    }
    w.write(&gguf);
    let err = import_gguf(&gguf, &out, ImportDtype::F32).expect_err("import fails");
    assert!(
        matches!(
            &err,
            ImportError::Gguf(GgufError::UnsupportedTensorType {
                ggml_type: GgmlType::Q4_K,
                ..
            })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("Q4_K"), "{err}");
    assert!(!out.exists(), "no output folder after a failed import");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("tiny.gguf")]);
}

#[test]
fn import_refuses_a_non_empty_output_folder_and_fills_an_empty_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("tiny.gguf");
    tiny_llama(false).write(&gguf);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    import_gguf(&gguf, &out, ImportDtype::F32).expect("empty folder is filled");
    let err = import_gguf(&gguf, &out, ImportDtype::F32).expect_err("second import");
    assert!(matches!(err, ImportError::OutputExists { .. }), "{err}");
}

#[test]
fn import_rejects_foreign_architectures_and_stray_or_missing_tensors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("bad.gguf");
    let out = dir.path().join("out");

    let mut w = tiny_llama(false);
    w.kvs.retain(|(k, _)| k != "general.architecture");
    w.kv("general.architecture", Kv::Str("qwen2".into()))
        .write(&gguf);
    let err = import_gguf(&gguf, &out, ImportDtype::F32).expect_err("qwen2");
    assert!(
        matches!(&err, ImportError::UnsupportedArchitecture { architecture } if architecture == "qwen2"),
        "{err}"
    );

    tiny_llama(false)
        .f32_tensor("blk.0.attn_q.bias", &[8], &[0.0; 8])
        .write(&gguf);
    let err = import_gguf(&gguf, &out, ImportDtype::F32).expect_err("bias");
    assert!(
        matches!(&err, ImportError::UnexpectedTensor { name } if name == "blk.0.attn_q.bias"),
        "{err}"
    );

    let mut w = tiny_llama(false);
    w.tensors.retain(|t| t.0 != "blk.1.attn_v.weight");
    w.write(&gguf);
    let err = import_gguf(&gguf, &out, ImportDtype::F32).expect_err("missing v");
    assert!(
        matches!(&err, ImportError::MissingTensor { name } if name == "blk.1.attn_v.weight"),
        "{err}"
    );

    let mut w = tiny_llama(false);
    w.kvs.retain(|(k, _)| k != "llama.attention.head_count_kv");
    w.kv("llama.attention.head_count_kv", Kv::U32(2))
        .write(&gguf);
    let err = import_gguf(&gguf, &out, ImportDtype::F32).expect_err("k rows");
    assert!(
        matches!(&err, ImportError::ShapeMismatch { name, found, expected } if name == "blk.0.attn_k.weight" && found == &[4, 8] && expected == &[8, 8]),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn cli_import_gguf_writes_the_folder_and_reports_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("tiny.gguf");
    tiny_llama(false).write(&gguf);
    let out = dir.path().join("out");
    let status = Command::new(env!("CARGO_BIN_EXE_punica"))
        .args(["model", "import-gguf"])
        .arg(&gguf)
        .arg(&out)
        .args(["--dtype", "bf16"])
        .status()
        .expect("run punica");
    assert!(status.success());
    assert_eq!(
        read_json(&out.join("config.json"))["torch_dtype"],
        "bfloat16"
    );

    let missing = Command::new(env!("CARGO_BIN_EXE_punica"))
        .args(["model", "import-gguf"])
        .arg(dir.path().join("nope.gguf"))
        .arg(dir.path().join("out2"))
        .output()
        .expect("run punica");
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("nope.gguf"), "{stderr}");
}

#[test]
fn rebuilt_tokenizers_load_for_each_supported_pre_tokenizer_and_honour_add_bos() {
    for pre in ["smollm", "gpt2", "default", "llama-bpe"] {
        for add_bos in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let gguf = dir.path().join("tiny.gguf");
            let mut w = tiny_llama(false);
            w.kvs
                .retain(|(k, _)| k != "tokenizer.ggml.pre" && k != "tokenizer.ggml.add_bos_token");
            w.kv("tokenizer.ggml.pre", Kv::Str(pre.into()))
                .kv("tokenizer.ggml.add_bos_token", Kv::Bool(add_bos))
                .write(&gguf);
            let out = dir.path().join("out");
            import_gguf(&gguf, &out, ImportDtype::F32).unwrap_or_else(|e| panic!("{pre}: {e}"));
            let tok = punica::engine::model::tokenizer::Tokenizer::from_dir(&out).expect("loads");
            let text = "the 12 thé 🦀";
            let plain = tok.encode(text, false).expect("encode");
            assert_eq!(tok.decode(&plain, false).expect("decode"), text, "{pre}");
            let with_special = tok.encode(text, true).expect("encode");
            if add_bos {
                assert_eq!(with_special[0], 0, "{pre}: bos first");
                let raw = tok.inner().encode(text, true).expect("encode");
                assert_eq!(
                    raw.get_ids()[0],
                    0,
                    "{pre}: tokenizer.json's post-processor adds bos"
                );
                assert_eq!(with_special[1..], plain[..], "{pre}");
            } else {
                assert_eq!(with_special, plain, "{pre}");
            }
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("tiny.gguf");
    let mut w = tiny_llama(false);
    w.kvs.retain(|(k, _)| k != "tokenizer.ggml.pre");
    w.kv("tokenizer.ggml.pre", Kv::Str("deepseek-coder".into()))
        .write(&gguf);
    let err =
        import_gguf(&gguf, &dir.path().join("out"), ImportDtype::F32).expect_err("unknown pre");
    assert!(
        matches!(&err, ImportError::Tokenizer { reason } if reason.contains("deepseek-coder")),
        "{err}"
    );
}
