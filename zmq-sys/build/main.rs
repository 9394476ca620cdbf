//! Builds libzmq (vendored in `zeromq-src`) with CURVE, linked against the
//! libsodium that `libsodium-sys-stable` built. That crate declares
//! `links = "sodium"`, so cargo gives this script its `lib` and `include`
//! directories as `DEP_SODIUM_LIB` and `DEP_SODIUM_INCLUDE`.
//!
//! libzmq calls `sodium_init()` itself (when a context is created and in
//! `zmq_curve_keypair`), so nothing in Rust has to.

use std::env;

fn sodium_dir(var: &str) -> String {
    match env::var(var) {
        Ok(dir) => dir,
        Err(e) => panic!(
            "zmq-sys: {var} is not set ({e}); libsodium-sys-stable should have set it \
             (it declares links = \"sodium\" and prints cargo:lib / cargo:include)"
        ),
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build/main.rs");
    println!("cargo:rerun-if-env-changed=DEP_SODIUM_LIB");
    println!("cargo:rerun-if-env-changed=DEP_SODIUM_INCLUDE");
    let lib = sodium_dir("DEP_SODIUM_LIB");
    let include = sodium_dir("DEP_SODIUM_INCLUDE");
    quiet_vendored_warnings();
    zeromq_src::Build::new().with_libsodium(Some(zeromq_src::LibLocation::new(lib, include))).build();
}

/// libzmq's own sources raise compiler warnings (unused parameters, switch
/// fall-throughs) that are not ours to fix. Because this crate is a workspace
/// member, cargo would print each one on every fresh build (it hides them only
/// for crates from the registry), burying warnings that are ours. `-w` turns
/// them off for this build script's compilations only: `cc` adds the flags of
/// `CFLAGS_<target>`/`CXXFLAGS_<target>` to those of `CFLAGS`/`CXXFLAGS`, and
/// what we set here lives in this process alone. Flags a user set are kept.
fn quiet_vendored_warnings() {
    let target = env::var("TARGET").unwrap_or_default().replace('-', "_");
    for flags in ["CFLAGS", "CXXFLAGS"] {
        let var = format!("{flags}_{target}");
        let mut value = env::var(&var).unwrap_or_default();
        value.push_str(" -w");
        env::set_var(&var, value.trim_start());
    }
}
