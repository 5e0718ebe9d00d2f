//! The GGUF reader on hand-built files: every value type, dequantisation formulas, and hostile
//! or truncated inputs that must give precise errors and never panic.

use half::{bf16, f16};
use punica::engine::model::gguf::{
    GgmlType, GgufError, GgufFile, GgufHeader, GgufValue, dequantize,
};

use crate::helpers::{GgufWriter, Kv, put_str};

fn header_only(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(n_tensors.to_le_bytes());
    out.extend(n_kv.to_le_bytes());
    out
}

fn small_valid_file() -> Vec<u8> {
    GgufWriter::default()
        .kv("general.architecture", Kv::Str("llama".into()))
        .kv(
            "tokenizer.ggml.tokens",
            Kv::StrArray(vec!["a".into(), "b".into()]),
        )
        .f32_tensor("a.weight", &[2, 2], &[1.0, 2.0, 3.0, 4.0])
        .f32_tensor("b.weight", &[3], &[5.0, 6.0, 7.0])
        .to_bytes()
}

#[test]
fn reader_parses_every_metadata_value_type() {
    let mut b = header_only(0, 13);
    let mut kv = |key: &str, ty: u32, payload: &[u8]| {
        put_str(&mut b, key);
        b.extend(ty.to_le_bytes());
        b.extend(payload);
    };
    kv("u8", 0, &[200]);
    kv("i8", 1, &(-5i8).to_le_bytes());
    kv("u16", 2, &60000u16.to_le_bytes());
    kv("i16", 3, &(-30000i16).to_le_bytes());
    kv("u32", 4, &4_000_000_000u32.to_le_bytes());
    kv("i32", 5, &(-2_000_000_000i32).to_le_bytes());
    kv("f32", 6, &1e-5f32.to_le_bytes());
    kv("bool", 7, &[1]);
    let mut s = Vec::new();
    put_str(&mut s, "héllo");
    kv("string", 8, &s);
    let mut arr = 9u32.to_le_bytes().to_vec(); // array of arrays of u16
    arr.extend(2u64.to_le_bytes());
    for chunk in [[1u16, 2], [3, 4]] {
        arr.extend(2u32.to_le_bytes());
        arr.extend(2u64.to_le_bytes());
        for v in chunk {
            arr.extend(v.to_le_bytes());
        }
    }
    kv("array", 9, &arr);
    kv("u64", 10, &u64::MAX.to_le_bytes());
    kv("i64", 11, &i64::MIN.to_le_bytes());
    kv("f64", 12, &0.1f64.to_le_bytes());

    let h = GgufHeader::parse(&b).expect("valid header");
    assert_eq!(h.version, 3);
    assert_eq!(h.get("u8"), Some(&GgufValue::U8(200)));
    assert_eq!(h.get("i8"), Some(&GgufValue::I8(-5)));
    assert_eq!(h.get("u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(h.get("i16"), Some(&GgufValue::I16(-30000)));
    assert_eq!(h.get("u32"), Some(&GgufValue::U32(4_000_000_000)));
    assert_eq!(h.get("i32"), Some(&GgufValue::I32(-2_000_000_000)));
    assert_eq!(h.opt_f64("f32").expect("f32"), Some(1e-5));
    assert_eq!(h.get("bool"), Some(&GgufValue::Bool(true)));
    assert_eq!(h.require_str("string").expect("string"), "héllo");
    let nested = h.require_array("array").expect("array");
    assert_eq!(
        nested,
        &[
            GgufValue::Array(vec![GgufValue::U16(1), GgufValue::U16(2)]),
            GgufValue::Array(vec![GgufValue::U16(3), GgufValue::U16(4)]),
        ]
    );
    assert_eq!(h.require_u64("u64").expect("u64"), u64::MAX);
    assert_eq!(h.get("i64"), Some(&GgufValue::I64(i64::MIN)));
    assert_eq!(h.opt_f64("f64").expect("f64"), Some(0.1));
    assert!(matches!(
        h.require_u64("i8"),
        Err(GgufError::WrongValueType {
            expected: "unsigned integer",
            found: "i8",
            ..
        })
    ));
    assert!(matches!(h.require_str("nope"), Err(GgufError::MissingKey { key }) if key == "nope"));
}

#[test]
fn reader_locates_tensors_after_the_aligned_header() {
    let bytes = small_valid_file();
    let file = GgufFile::from_bytes(bytes).expect("valid file");
    assert_eq!(file.header.data_offset % 32, 0);
    let a = file.header.tensor("a.weight").expect("a");
    assert_eq!(a.shape(), vec![2, 2]);
    assert_eq!(file.dequantize(a).expect("f32"), vec![1.0, 2.0, 3.0, 4.0]);
    let b = file.header.tensor("b.weight").expect("b");
    assert_eq!(b.offset, 32);
    assert_eq!(file.dequantize(b).expect("f32"), vec![5.0, 6.0, 7.0]);
}

#[test]
fn reader_honours_a_custom_alignment() {
    let bytes = GgufWriter::default()
        .kv("general.alignment", Kv::U32(256))
        .f32_tensor("a", &[3], &[1.0, 2.0, 3.0])
        .f32_tensor("b", &[1], &[4.0])
        .to_bytes();
    let file = GgufFile::from_bytes(bytes).expect("valid file");
    assert_eq!(file.header.alignment, 256);
    assert_eq!(file.header.data_offset % 256, 0);
    let b = file.header.tensor("b").expect("b");
    assert_eq!(b.offset, 256);
    assert_eq!(file.dequantize(b).expect("f32"), vec![4.0]);
    let bad = GgufWriter::default()
        .kv("general.alignment", Kv::U32(48))
        .to_bytes();
    assert!(matches!(
        GgufHeader::parse(&bad),
        Err(GgufError::BadAlignment { alignment: 48 })
    ));
}

#[test]
fn reader_rejects_bad_magic() {
    let mut bytes = small_valid_file();
    bytes[..4].copy_from_slice(b"GGML");
    let err = GgufHeader::parse(&bytes).expect_err("bad magic");
    assert!(
        matches!(&err, GgufError::BadMagic { found } if found == b"GGML"),
        "{err}"
    );
    assert!(matches!(
        GgufHeader::parse(b"GG"),
        Err(GgufError::Truncated { needed: 4, .. })
    ));
}

#[test]
fn reader_rejects_versions_other_than_two_and_three() {
    for version in [0u32, 1, 4, u32::MAX] {
        let mut bytes = small_valid_file();
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        assert!(matches!(
            GgufHeader::parse(&bytes),
            Err(GgufError::UnsupportedVersion { version: v }) if v == version
        ));
    }
}

#[test]
fn reader_rejects_counts_that_cannot_fit_in_the_file() {
    let err = GgufHeader::parse(&header_only(u64::MAX, 0)).expect_err("huge tensor count");
    assert!(
        matches!(
            &err,
            GgufError::CountTooLarge {
                count: u64::MAX,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("tensor"), "{err}");
    let err = GgufHeader::parse(&header_only(0, 1 << 40)).expect_err("huge kv count");
    assert!(
        matches!(&err, GgufError::CountTooLarge { count, .. } if *count == 1 << 40),
        "{err}"
    );
}

#[test]
fn reader_rejects_a_string_longer_than_the_file() {
    let mut b = header_only(0, 1);
    b.extend(u64::MAX.to_le_bytes());
    b.extend(b"key");
    b.extend([0u8; 32]);
    let err = GgufHeader::parse(&b).expect_err("huge string");
    assert!(
        matches!(
            &err,
            GgufError::Truncated {
                needed: u64::MAX,
                offset: 32,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn reader_rejects_huge_arrays_before_allocating() {
    for count in [u64::MAX, 1 << 30, 1000] {
        let mut b = header_only(0, 1);
        put_str(&mut b, "arr");
        b.extend(9u32.to_le_bytes());
        b.extend(6u32.to_le_bytes());
        b.extend(count.to_le_bytes());
        b.extend([0u8; 16]);
        let err = GgufHeader::parse(&b).expect_err("array too long");
        assert!(
            matches!(&err, GgufError::ArrayTooLong { count: c, .. } | GgufError::CountTooLarge { count: c, .. } if *c == count),
            "{err}"
        );
    }
}

#[test]
fn reader_rejects_deeply_nested_arrays() {
    let mut b = header_only(0, 1);
    put_str(&mut b, "deep");
    b.extend(9u32.to_le_bytes());
    for _ in 0..64 {
        b.extend(9u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
    }
    b.extend([0u8; 64]);
    let err = GgufHeader::parse(&b).expect_err("too deep");
    assert!(
        matches!(&err, GgufError::NestingTooDeep { max: 4, .. }),
        "{err}"
    );
}

#[test]
fn reader_rejects_unknown_value_types_and_invalid_utf8() {
    let mut b = header_only(0, 1);
    put_str(&mut b, "k");
    b.extend(13u32.to_le_bytes());
    b.extend([0u8; 8]);
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(GgufError::UnknownValueType { type_id: 13, .. })
    ));
    let mut b = header_only(0, 1);
    b.extend(2u64.to_le_bytes());
    b.extend([0xff, 0xfe]);
    b.extend(4u32.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(GgufError::InvalidUtf8 { offset: 32, .. })
    ));
}

#[test]
fn reader_rejects_duplicate_keys_and_tensors() {
    let dup_key = GgufWriter::default()
        .kv("a", Kv::U32(1))
        .kv("a", Kv::U32(2))
        .to_bytes();
    assert!(
        matches!(GgufHeader::parse(&dup_key), Err(GgufError::DuplicateKey { key }) if key == "a")
    );
    let dup_tensor = GgufWriter::default()
        .f32_tensor("t", &[1], &[0.0])
        .f32_tensor("t", &[1], &[0.0])
        .to_bytes();
    assert!(
        matches!(GgufHeader::parse(&dup_tensor), Err(GgufError::DuplicateTensor { name }) if name == "t")
    );
}

#[test]
fn reader_rejects_truncated_tensor_data() {
    let mut bytes = small_valid_file();
    bytes.truncate(bytes.len() - 1);
    let err = GgufHeader::parse(&bytes).expect_err("truncated data");
    assert!(
        matches!(&err, GgufError::TensorOutOfBounds { name, end, file_len, .. } if name == "b.weight" && end == &(*file_len + 1)),
        "{err}"
    );
}

#[test]
fn reader_rejects_bad_tensor_shapes_types_and_offsets() {
    type Check = fn(&GgufError) -> bool;
    let cases: Vec<(GgufWriter, Check)> = vec![
        (
            GgufWriter::default().tensor("t", &[32], 99, vec![0; 64]),
            |e| matches!(e, GgufError::UnknownTensorType { type_id: 99, name } if name == "t"),
        ),
        (
            GgufWriter::default().tensor("t", &[1, 1, 1, 1, 1], 0, vec![0; 4]),
            |e| matches!(e, GgufError::BadDimensionCount { n_dims: 5, .. }),
        ),
        (
            GgufWriter::default().tensor("t", &[u64::MAX, 4], 0, vec![0; 4]),
            |e| matches!(e, GgufError::BadShape { reason, .. } if reason.contains("overflow")),
        ),
        (
            GgufWriter::default().tensor("t", &[0], 0, vec![]),
            |e| matches!(e, GgufError::BadShape { reason, .. } if reason.contains("zero")),
        ),
        (
            GgufWriter::default().tensor("t", &[33], 8, vec![0; 34]),
            |e| matches!(e, GgufError::BadShape { ggml_type: GgmlType::Q8_0, reason, .. } if reason.contains("block")),
        ),
    ];
    for (writer, expected) in cases {
        let err = GgufHeader::parse(&writer.to_bytes()).expect_err("invalid tensor");
        assert!(expected(&err), "unexpected error: {err}");
    }
    let mut misaligned = header_only(1, 0);
    put_str(&mut misaligned, "t");
    misaligned.extend(1u32.to_le_bytes());
    misaligned.extend(1u64.to_le_bytes());
    misaligned.extend(0u32.to_le_bytes());
    misaligned.extend(4u64.to_le_bytes());
    misaligned.resize(misaligned.len().next_multiple_of(32) + 64, 0);
    let err = GgufHeader::parse(&misaligned).expect_err("misaligned");
    assert!(
        matches!(
            err,
            GgufError::MisalignedTensor {
                offset: 4,
                alignment: 32,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error_not_a_panic() {
    let bytes = small_valid_file();
    assert!(GgufHeader::parse(&bytes).is_ok());
    for len in 0..bytes.len() {
        let result = std::panic::catch_unwind(|| GgufHeader::parse(&bytes[..len]).is_err());
        assert_eq!(result.ok(), Some(true), "prefix of {len} bytes");
    }
}

#[test]
fn corrupted_bytes_never_panic_the_reader() {
    let bytes = small_valid_file();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..4000 {
        let mut copy = bytes.clone();
        for _ in 0..3 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let pos = (state % copy.len() as u64) as usize;
            copy[pos] = (state >> 32) as u8;
        }
        let result = std::panic::catch_unwind(|| {
            if let Ok(file) = GgufFile::from_bytes(copy.clone()) {
                for t in &file.header.tensors {
                    let _ = file.dequantize(t);
                }
            }
        });
        assert!(result.is_ok(), "panicked on {copy:?}");
    }
}

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

#[test]
fn dequantize_q8_0_is_scale_times_int8() {
    let mut block = f16_bytes(0.5).to_vec();
    let qs: Vec<i8> = (0..32).map(|i| (i * 8 - 128) as i8).collect();
    block.extend(qs.iter().map(|&q| q as u8));
    let out = dequantize("t", GgmlType::Q8_0, &block, 32).expect("q8_0");
    let expected: Vec<f32> = qs.iter().map(|&q| f32::from(q) * 0.5).collect();
    assert_eq!(out, expected);
}

#[test]
fn dequantize_q4_0_puts_low_nibbles_first_and_centres_on_eight() {
    let mut block = f16_bytes(0.25).to_vec();
    let qs: Vec<u8> = (0..16u8).map(|i| (i << 4) | (15 - i)).collect();
    block.extend(&qs);
    let out = dequantize("t", GgmlType::Q4_0, &block, 32).expect("q4_0");
    for i in 0..16 {
        assert_eq!(out[i], (f32::from(15 - i as u8) - 8.0) * 0.25, "weight {i}");
        assert_eq!(
            out[i + 16],
            (f32::from(i as u8) - 8.0) * 0.25,
            "weight {}",
            i + 16
        );
    }
}

#[test]
fn dequantize_q4_1_is_scale_times_nibble_plus_min() {
    // Two blocks, so block boundaries are exercised too.
    let mut data = Vec::new();
    for (d, m) in [(0.125f32, -1.0f32), (2.0, 0.5)] {
        data.extend(f16_bytes(d));
        data.extend(f16_bytes(m));
        data.extend((0..16u8).map(|i| ((i ^ 5) << 4) | i));
    }
    let out = dequantize("t", GgmlType::Q4_1, &data, 64).expect("q4_1");
    for (b, (d, m)) in [(0.125f32, -1.0f32), (2.0, 0.5)].into_iter().enumerate() {
        for i in 0..16 {
            assert_eq!(out[b * 32 + i], f32::from(i as u8) * d + m);
            assert_eq!(out[b * 32 + 16 + i], f32::from(i as u8 ^ 5) * d + m);
        }
    }
}

#[test]
fn dequantize_float_types_reads_little_endian_values() {
    let vals = [1.5f32, -0.0, 65504.0, 3.0e-5];
    let f32s: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(dequantize("t", GgmlType::F32, &f32s, 4).expect("f32"), vals);
    let f16s: Vec<u8> = vals.iter().flat_map(|&v| f16_bytes(v)).collect();
    let expected: Vec<f32> = vals.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    assert_eq!(
        dequantize("t", GgmlType::F16, &f16s, 4).expect("f16"),
        expected
    );
    let bf16s: Vec<u8> = vals
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let expected: Vec<f32> = vals.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    assert_eq!(
        dequantize("t", GgmlType::BF16, &bf16s, 4).expect("bf16"),
        expected
    );
}

#[test]
fn dequantize_names_the_unsupported_type() {
    let bytes = GgufWriter::default()
        .tensor("blk.0.attn_q.weight", &[256], 12, vec![0; 144])
        .to_bytes();
    let file = GgufFile::from_bytes(bytes).expect("Q4_K parses");
    let t = &file.header.tensors[0];
    let err = file.dequantize(t).expect_err("Q4_K is not dequantised");
    assert!(matches!(
        &err,
        GgufError::UnsupportedTensorType {
            ggml_type: GgmlType::Q4_K,
            ..
        }
    ));
    let msg = err.to_string();
    assert!(
        msg.contains("Q4_K") && msg.contains("blk.0.attn_q.weight"),
        "{msg}"
    );
}

#[test]
fn dequantize_rejects_data_of_the_wrong_length() {
    assert!(matches!(
        dequantize("t", GgmlType::Q4_1, &[0; 19], 32),
        Err(GgufError::BadShape { .. })
    ));
    assert!(matches!(
        dequantize("t", GgmlType::F32, &[0; 8], 3),
        Err(GgufError::BadShape { .. })
    ));
}

#[test]
fn tensor_infos_edited_after_parsing_give_errors_not_panics() {
    let file = GgufFile::from_bytes(small_valid_file()).expect("valid file");
    let mut info = file.header.tensor("b.weight").expect("b").clone();
    info.offset = u64::MAX - 4;
    assert!(matches!(
        file.dequantize(&info),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
    info.offset = 0;
    info.dims = vec![1 << 20];
    info.n_bytes = 4 << 20;
    assert!(matches!(
        file.tensor_bytes(&info),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
}
