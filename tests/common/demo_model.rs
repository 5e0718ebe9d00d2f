//! The demo model on disk, shared by the test binaries that load it (each includes this file).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The imported SmolLM2-135M-Instruct folder. Runs scripts/fetch-demo-model.sh (with this
/// build's punica binary) when the folder is missing; panics, failing the test, when the model
/// cannot be obtained.
pub fn demo_model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::var_os("PUNICA_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("models/smollm2-135m"));
        if !dir.join("config.json").exists() {
            let status = Command::new(root.join("scripts/fetch-demo-model.sh"))
                .env("PUNICA_BIN", env!("CARGO_BIN_EXE_punica"))
                .env("PUNICA_MODEL_DIR", &dir)
                .status()
                .expect("scripts/fetch-demo-model.sh runs");
            assert!(status.success(), "fetch-demo-model.sh failed: {status}");
        }
        assert!(
            dir.join("config.json").exists(),
            "{} has no config.json",
            dir.display()
        );
        dir
    })
}
