//! Embeds the CUDA kernel sources (kernels/*.cu, *.cuh) into the binary as a generated table, so
//! the release binary carries its kernels and compiles them at run time through NVRTC. Also tells
//! Cargo to rerun when kernels or migrations change (new files included).

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=migrations");
    // Every commit appends to the HEAD log: rerun so the recorded revision follows it.
    println!("cargo:rerun-if-changed=.git/logs/HEAD");

    // The revision the binary was built from, for benchmark and self-test reports.
    let rev = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PUNICA_GIT_REV={rev}");

    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let dir = Path::new(&manifest).join("kernels");
    let mut files: Vec<(String, std::path::PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".cu") || name.ends_with(".cuh") {
                println!("cargo:rerun-if-changed={}", path.display());
                files.push((name, path));
            }
        }
    }
    files.sort();

    let mut out = String::from(
        "/// Kernel sources embedded at build time: (file name, contents), sorted by name.\n\
         pub const KERNEL_SOURCES: &[(&str, &str)] = &[\n",
    );
    for (name, path) in &files {
        let _ = writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            path.display().to_string()
        );
    }
    out.push_str("];\n");
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    std::fs::write(Path::new(&out_dir).join("kernel_sources.rs"), out)
        .expect("OUT_DIR is writable during the build");
}
