//! `punica bench engine` on the CPU backend: the steady-state workloads and the request whose
//! adapter is in no tier.

use std::path::PathBuf;

use punica::engine::bench::{BenchDevice, BenchEngineArgs, Workload, run};

fn args(cold_adapter: bool) -> BenchEngineArgs {
    BenchEngineArgs {
        model: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/untied")),
        synthetic: None,
        device: BenchDevice::Cpu,
        workload: vec![Workload::Distinct],
        adapters: 4,
        rank: 4,
        requests: 8,
        prompt_len: 8,
        prompt_sigma: 0.0,
        max_tokens: 16,
        rate: 0.0,
        max_running: 8,
        max_step_tokens: 256,
        seed: 3,
        output: None,
        gpu_memory_fraction: 0.9,
        cold_adapter,
        cold_probes: 3,
    }
}

#[test]
fn a_request_whose_adapter_is_in_no_tier_is_served_while_the_others_decode() {
    // A batch of 7 x 128 tokens, which outlasts the three probes' pairs several times over.
    let mut a = args(true);
    a.max_tokens = 32;
    let report = run(&a).unwrap();
    let section = report
        .split("### A request whose adapter is not resident, while 7 requests decode")
        .nth(1)
        .unwrap_or_else(|| panic!("no cold-adapter section in:\n{report}"));
    assert!(!section.contains("failed"), "{section}");
    assert!(
        section.contains("median (min..max) of 3 |"),
        "three cold requests: {section}"
    );
    // A row's median, minimum and maximum: "| label | 12.3 (10.1..15.2) |".
    let ttft = |label: &str| -> (f64, f64, f64) {
        let line = section
            .lines()
            .find(|l| l.starts_with(&format!("| {label}")))
            .unwrap_or_else(|| panic!("no row {label:?} in:\n{section}"));
        let cell = line.trim_end_matches(" |").rsplit("| ").next().unwrap();
        let (median, range) = cell.split_once(" (").unwrap();
        let (lo, hi) = range.trim_end_matches(')').split_once("..").unwrap();
        let [median, lo, hi] = [median, lo, hi].map(|v| v.parse::<f64>().unwrap());
        assert!(lo <= median && median <= hi, "{line}");
        (median, lo, hi)
    };
    let (warm, cold) = (ttft("adapter resident"), ttft("adapter in no tier"));
    assert!(warm.1 > 0.0 && cold.1 > 0.0, "{section}");
    // The loader's share is a part of each cold request's wait, so of their median too.
    let loader = ttft("of which on the loader thread");
    assert!(loader.1 > 0.0 && loader.0 < cold.0, "{section}");
    // The batch decoded through every cold request's wait.
    let meanwhile = section
        .lines()
        .find_map(|l| l.strip_prefix("The decoding requests meanwhile: "))
        .unwrap_or_else(|| panic!("no decoders' line in:\n{section}"));
    let tokens: usize = meanwhile.split(' ').next().unwrap().parse().unwrap();
    assert!(tokens > 0, "{section}");
    assert!(!section.contains("finished before"), "{section}");
}

#[test]
fn without_the_flag_the_report_has_no_cold_adapter_section() {
    let report = run(&args(false)).unwrap();
    assert!(report.contains("| distinct |"), "{report}");
    assert!(!report.contains("not resident"), "{report}");
}

#[test]
fn log_normal_prompts_are_served_in_full_and_reported() {
    let mut a = args(false);
    a.prompt_sigma = 0.8;
    let report = run(&a).unwrap();
    assert!(
        report.contains("prompt log-normal, median 8, sigma 0.8, 1..32 tokens"),
        "{report}"
    );
    // Every request got all its tokens, whatever its prompt's length.
    let row = report
        .lines()
        .find(|l| l.starts_with("| distinct | "))
        .unwrap_or_else(|| panic!("no distinct row in:\n{report}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert_eq!((cells[4], cells[5]), ("0", "128"), "{row}");
}
