//! Builds the XDP program from `unidler-ebpf` with aya-build and leaves the object in
//! `OUT_DIR`, where `src/datapath.rs` embeds it, so the agent is one self-contained binary.
//!
//! `cargo xtask setup` builds a bpf-linker that matches the nightly's LLVM into
//! `.tools/bin`; that folder is put first on PATH here so plain `cargo build` finds it.
use std::{env, path::PathBuf};

fn main() {
    // The fuzz targets (`fuzz/`) are built by cargo fuzz with sanitizer flags, which the BPF
    // target cannot take: they embed an object built before (UNIDLER_EBPF_OBJECT, a path; the
    // packet parser's target runs it), or none (UNIDLER_NO_EBPF=1: the parsers only).
    println!("cargo:rerun-if-env-changed=UNIDLER_NO_EBPF");
    println!("cargo:rerun-if-env-changed=UNIDLER_EBPF_OBJECT");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it"));
    if let Some(object) = env::var_os("UNIDLER_EBPF_OBJECT") {
        let object = PathBuf::from(object);
        println!("cargo:rerun-if-changed={}", object.display());
        std::fs::copy(&object, out.join("unidler"))
            .unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
        return;
    }
    if env::var("UNIDLER_NO_EBPF").as_deref() == Ok("1") {
        std::fs::write(out.join("unidler"), []).expect("writing the empty object");
        return;
    }
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let tools_bin = manifest_dir.join("../.tools/bin");
    println!("cargo:rerun-if-changed={}", tools_bin.display());
    if tools_bin.join("bpf-linker").exists() {
        let path = env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![tools_bin];
        paths.extend(env::split_paths(&path));
        let joined = env::join_paths(paths).expect("PATH entries are valid");
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        unsafe { env::set_var("PATH", joined) };
    }
    // aya-build relays everything the eBPF build's cargo prints on stderr as `cargo:warning=`
    // lines: quiet, cargo prints no progress there (its compiler diagnostics, real warnings
    // included, still come through).
    // SAFETY: as above.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    let ebpf_dir = manifest_dir.join("../unidler-ebpf");
    let package = aya_build::Package {
        name: "unidler-ebpf",
        root_dir: ebpf_dir.to_str().expect("UTF-8 path"),
        ..Default::default()
    };
    if let Err(err) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        panic!("building the XDP program failed: {err:#}\nhint: run `cargo xtask setup` first");
    }
}
