//! Build script. `sqlx::migrate!` embeds `migrations/` at compile time, but cargo does not notice
//! new files there on its own: watch the folder so a new migration triggers a rebuild.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
