//! Toolchain bootstrap: everything a fresh machine lacks, installed idempotently.
//!
//! 1. the nightly toolchain's `rust-src` component (the eBPF crate builds `core` itself);
//! 2. a `bpf-linker` built from crates.io against the nightly's own libLLVM, cached in
//!    `.tools/<libLLVM name>/` and linked as `.tools/bin/bpf-linker`;
//! 3. the Debian packages the tests use, and `kubernetes-validate` from PyPI in
//!    `.tools/kubernetes-validate/` (the manifests' test validates against Kubernetes' schemas
//!    with it, offline);
//! 4. `cargo-fuzz` from crates.io, built into `.tools/cargo-fuzz-<version>/` and linked as
//!    `.tools/bin/cargo-fuzz`, for the coverage-guided fuzz targets in `fuzz/`;
//! 5. for the kernel matrix only ([`ensure_vm_tools`]): qemu, `depmod` and busybox from
//!    Debian, and virtme-ng (`vng`), from PATH or installed from PyPI into `.tools/virtme-ng/`.
//!
//! Each step says what it checks and what it does, and a failure says what to do about it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{output_of, run, workspace_root};

/// The bpf-linker release we build; its `llvm-N` feature must match the nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The toolchain the eBPF crate is built with (aya-build's default).
const NIGHTLY: &str = "nightly";
/// Debian packages the tests need: `ip` for namespaces and veths; OVN and OVS for the
/// database tests (`ovsdb-server`, `ovsdb-tool`, `ovn-sbctl`, the OVN schemas); OVS's switch
/// (`ovs-vswitchd`) and `ovn-controller` for the benchmarks' side by side with OVN; `ethtool`
/// for the pods' checksum offloads in the tests with a real OVN node; `g++` for libFuzzer,
/// which the fuzz targets compile.
const DEBIAN_PACKAGES: &[&str] = &[
    "ethtool",
    "g++",
    "iproute2",
    "ovn-central",
    "ovn-host",
    "openvswitch-common",
    "openvswitch-switch",
];
/// Debian packages the kernel matrix needs: qemu (TCG: nested KVM is not assumed), `depmod`
/// (`kmod`) to index the unpacked kernels' modules, and the static busybox virtme-ng puts in
/// its initramfs.
const VM_DEBIAN_PACKAGES: &[&str] = &["busybox-static", "kmod", "qemu-system-x86"];
/// The virtme-ng release installed from PyPI when no `vng` is on PATH.
const VIRTME_NG_VERSION: &str = "1.42";
/// The cargo-fuzz release the fuzz targets are driven with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The kubernetes-validate release the manifests are validated with (its schemas are of
/// Kubernetes 1.37).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Runs every bootstrap step; returns the folder to put first on PATH (holds bpf-linker).
pub fn ensure_all() -> Result<PathBuf> {
    ensure_rust_src()?;
    let bin = ensure_bpf_linker()?;
    ensure_debian_packages(DEBIAN_PACKAGES)?;
    ensure_kubernetes_validate()?;
    ensure_cargo_fuzz()?;
    Ok(bin)
}

/// What building the fuzz targets needs besides the toolchains (lint checks them too): a C++
/// compiler for libFuzzer.
pub fn ensure_fuzz_build_tools() -> Result<()> {
    ensure_debian_packages(&["g++"])
}

/// `cargo-fuzz` in `.tools/bin`, built from crates.io once.
fn ensure_cargo_fuzz() -> Result<()> {
    let tools = workspace_root().join(".tools");
    let root = tools.join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let binary = root.join("bin").join("cargo-fuzz");
    let works = |b: &Path| {
        Command::new(b)
            .args(["fuzz", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&binary) {
        step(&format!("cargo-fuzz {CARGO_FUZZ_VERSION} is built"));
    } else {
        step(&format!(
            "building cargo-fuzz {CARGO_FUZZ_VERSION} from crates.io; about two minutes"
        ));
        run(Command::new("cargo")
            .args([
                "install",
                &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
                "--locked",
                "--root",
            ])
            .arg(&root)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTC_WRAPPER"))
        .context("building cargo-fuzz failed; see cargo's output above. It needs crates.io")?;
        if !works(&binary) {
            bail!("{} was built but does not run", binary.display());
        }
    }
    link_tool(&format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"), "cargo-fuzz").map(drop)
}

/// Links `.tools/bin/<name>` to `.tools/<root>/bin/<name>` (once); returns `.tools/bin`.
fn link_tool(root: &str, name: &str) -> Result<PathBuf> {
    let bin_dir = workspace_root().join(".tools").join("bin");
    fs::create_dir_all(&bin_dir)?;
    let link = bin_dir.join(name);
    let target = Path::new("..").join(root).join("bin").join(name);
    if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(bin_dir)
}

/// `kubernetes-validate` in `.tools/kubernetes-validate/`, from PyPI, for the manifests' test.
fn ensure_kubernetes_validate() -> Result<()> {
    let venv = workspace_root().join(".tools").join("kubernetes-validate");
    let tool = venv.join("bin").join("kubernetes-validate");
    let installed = Command::new(&tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains(KUBERNETES_VALIDATE_VERSION)
        });
    if installed {
        step(&format!(
            "kubernetes-validate {KUBERNETES_VALIDATE_VERSION} is installed in {}",
            venv.display()
        ));
        return Ok(());
    }
    step(&format!(
        "installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} from PyPI into {}",
        venv.display()
    ));
    pip_install(&venv, "kubernetes-validate", KUBERNETES_VALIDATE_VERSION).context("it needs PyPI")
}

/// Installs `package`, pinned to `version`, from PyPI into a new virtual environment at
/// `venv`, made with Debian's own Python (whose venv module comes with python3-venv).
fn pip_install(venv: &Path, package: &str, version: &str) -> Result<()> {
    ensure_debian_packages(&["python3-venv"])?;
    run(Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(venv))
    .with_context(|| format!("could not make a Python virtual environment for {package}"))?;
    run(Command::new(venv.join("bin").join("pip")).args([
        "install",
        "--quiet",
        &format!("{package}=={version}"),
    ]))
    .with_context(|| format!("`pip install {package}` failed"))
}

/// Only what building needs (no Debian packages).
pub fn ensure_build_tools() -> Result<PathBuf> {
    ensure_rust_src()?;
    ensure_bpf_linker()
}

fn step(what: &str) {
    eprintln!("[setup] {what}");
}

fn ensure_rust_src() -> Result<()> {
    let installed = output_of(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .context(
        "could not ask rustup about the nightly toolchain; install it with \
         `rustup toolchain install nightly`",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly has rust-src");
        return Ok(());
    }
    step("adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
        .context("`rustup component add rust-src --toolchain nightly` failed")
}

/// What the nightly's LLVM is: its major version and the name of its shared library.
struct NightlyLlvm {
    major: u32,
    /// e.g. `LLVM-22-rust-1.97.0-nightly` (the file is `lib<name>.so`).
    lib_name: String,
    lib_dir: PathBuf,
}

fn nightly_llvm() -> Result<NightlyLlvm> {
    let version = output_of(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))
        .context("`rustc +nightly -vV` failed; is the nightly toolchain installed?")?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    let major: u32 = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("unexpected LLVM version {llvm:?}"))?;
    let sysroot =
        output_of(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let prefix = format!("libLLVM-{major}");
    let lib_name = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|f| {
            f.starts_with(&prefix)
                .then(|| f.strip_suffix(".so").map(|s| s["lib".len()..].to_owned()))
                .flatten()
        })
        .with_context(|| {
            format!(
                "no {prefix}*.so in {}: the nightly toolchain ships no shared libLLVM",
                lib_dir.display()
            )
        })?;
    Ok(NightlyLlvm {
        major,
        lib_name,
        lib_dir,
    })
}

fn ensure_bpf_linker() -> Result<PathBuf> {
    let tools = workspace_root().join(".tools");
    let llvm = nightly_llvm()?;
    let root = tools.join(&llvm.lib_name);
    let linker = root.join("bin").join("bpf-linker");
    if !linker_works(&linker) {
        step(&format!(
            "building bpf-linker {BPF_LINKER_VERSION} against {} (LLVM {}); about a minute",
            llvm.lib_name, llvm.major
        ));
        let lib_dir = llvm.lib_dir.display();
        let rustflags = format!(
            "-L native={lib_dir} -l dylib={} -C link-arg=-Wl,-rpath,{lib_dir}",
            llvm.lib_name
        );
        let host = host_triple()?;
        run(Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                &format!("llvm-{},no-llvm-linking", llvm.major),
                "--target",
                &host,
                "--root",
            ])
            .arg(&root)
            .env("RUSTFLAGS", rustflags)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTC_WRAPPER"))
        .context(
            "building bpf-linker failed; see cargo's output above. It needs crates.io and \
             the nightly's libLLVM (rustup component list --toolchain nightly)",
        )?;
        if !linker_works(&linker) {
            bail!("{} was built but does not run", linker.display());
        }
    } else {
        step(&format!("bpf-linker for {} is built", llvm.lib_name));
    }
    link_tool(&llvm.lib_name, "bpf-linker")
}

fn linker_works(linker: &Path) -> bool {
    linker.exists()
        && Command::new(linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn host_triple() -> Result<String> {
    let version = output_of(Command::new("rustc").arg("-vV"))?;
    version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("`rustc -vV` printed no host triple")
}

/// What the kernel matrix boots its guests with (on top of [`ensure_all`]): qemu, `depmod`
/// and busybox from Debian, and virtme-ng; returns the `vng` to run.
pub fn ensure_vm_tools() -> Result<PathBuf> {
    ensure_debian_packages(VM_DEBIAN_PACKAGES)?;
    if let Some(vng) = working_vng(Path::new("vng")) {
        step(&format!("virtme-ng is on PATH ({vng})"));
        return Ok(PathBuf::from("vng"));
    }
    let venv = workspace_root().join(".tools").join("virtme-ng");
    let vng = venv.join("bin").join("vng");
    if let Some(version) = working_vng(&vng) {
        step(&format!(
            "virtme-ng is installed in {} ({version})",
            venv.display()
        ));
        return Ok(vng);
    }
    step(&format!(
        "installing virtme-ng {VIRTME_NG_VERSION} from PyPI into {}",
        venv.display()
    ));
    pip_install(&venv, "virtme-ng", VIRTME_NG_VERSION)
        .context("it needs PyPI (or install it yourself: `vng` on PATH)")?;
    working_vng(&vng)
        .map(|_| vng.clone())
        .with_context(|| format!("{} was installed but does not run", vng.display()))
}

/// `vng --version`'s answer, if `vng` runs.
fn working_vng(vng: &Path) -> Option<String> {
    let out = Command::new(vng).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Installs those of `packages` that are not installed, with apt-get.
fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step(&format!(
            "Debian packages are installed: {}",
            packages.join(" ")
        ));
        return Ok(());
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    let sudo = !crate::is_root();
    let apt = |args: &[&str]| {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        } else {
            Command::new("apt-get")
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(&mut apt(&["update", "-q"])).context("`apt-get update` failed")?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install).with_context(|| {
        format!(
            "`apt-get install {}` failed; install them by hand and run this again",
            missing.join(" ")
        )
    })
}
