//! Without the `bundled-duckdb` feature, ichibase links a prebuilt libduckdb.so from
//! DUCKDB_LIB_DIR (see scripts/duckdb-lib): record that directory as the run-time search path of
//! every binary, test and benchmark, so they start without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    if std::env::var_os("CARGO_FEATURE_BUNDLED_DUCKDB").is_none() {
        if let Ok(dir) = std::env::var("DUCKDB_LIB_DIR") {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
}
