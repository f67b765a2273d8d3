//! Without the `bundled-duckdb` feature, ichibase links a prebuilt libduckdb.so from
//! DUCKDB_LIB_DIR (see scripts/duckdb-lib): record that directory as the run-time search path of
//! every binary, test and benchmark, so they start without LD_LIBRARY_PATH.
//!
//! Change capture (src/storage/capture.rs) needs SQLite's pre-update hook, which the bundled
//! SQLite has only when built with `LIBSQLITE3_FLAGS=-DSQLITE_ENABLE_PREUPDATE_HOOK` (set in
//! .cargo/config.toml): refuse to build without it, with a message saying so.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBSQLITE3_FLAGS");
    let flags = std::env::var("LIBSQLITE3_FLAGS").unwrap_or_default();
    if !flags.contains("SQLITE_ENABLE_PREUPDATE_HOOK") {
        panic!(
            "LIBSQLITE3_FLAGS must include -DSQLITE_ENABLE_PREUPDATE_HOOK (change capture needs SQLite's pre-update hook); \
             build from the repository root so cargo reads .cargo/config.toml, or export LIBSQLITE3_FLAGS=-DSQLITE_ENABLE_PREUPDATE_HOOK"
        );
    }
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    if std::env::var_os("CARGO_FEATURE_BUNDLED_DUCKDB").is_none() {
        if let Ok(dir) = std::env::var("DUCKDB_LIB_DIR") {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
}
