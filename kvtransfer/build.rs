//! Generates the UCP bindings from the system's UCX headers (Debian's `libucx-dev`), and links
//! `libucp` / `libucs` as `pkg-config` reports them.

fn main() {
    let ucx = pkg_config::Config::new()
        .atleast_version("1.13")
        .probe("ucx")
        .expect("UCX not found: install Debian's libucx-dev (scripts/install.sh does)");
    println!("cargo:rerun-if-changed=wrapper.h");
    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("ucp_.*")
        .allowlist_type("ucp_.*")
        .allowlist_type("ucs_status_t")
        .allowlist_var("UCP_.*")
        .allowlist_var("UCS_.*")
        .allowlist_function("ucs_status_string")
        .prepend_enum_name(false)
        .layout_tests(false)
        .derive_default(true)
        .generate_comments(false);
    for dir in &ucx.include_paths {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    builder
        .generate()
        .expect("generating the UCX bindings")
        .write_to_file(out.join("ucp.rs"))
        .expect("writing the UCX bindings");
}
