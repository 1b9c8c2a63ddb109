//! Makes cargo rebuild the program when `bpf-linker` changes.
use which::which;

fn main() {
    let linker = which("bpf-linker").unwrap_or_else(|err| {
        panic!("bpf-linker not found on PATH ({err}); run `cargo xtask setup` once")
    });
    println!("cargo:rerun-if-changed={}", linker.display());
}
