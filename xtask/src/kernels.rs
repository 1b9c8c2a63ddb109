//! Debian's kernel packages for the kernel matrix, fetched with apt, unpacked and indexed with
//! `depmod` under `.tools/kernels/` (git-ignored), once.
//!
//! Each series is resolved through its archive's `linux-image-amd64` (the kernel Debian ships
//! there today), and what was fetched is recorded in `.tools/kernels/<series>.fetched`: later
//! runs use it without the network. Deleting that file fetches the archive's current kernel.
//!
//! Layout: `apt/<archive>/` (an apt configuration of its own: the machine's `/etc/apt` is not
//! touched), `debs/` (the packages), `root/boot/vmlinuz-<release>` and
//! `root/lib/modules/<release>/`, where virtme-ng finds the modules of the image it boots.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{output_of, run, workspace_root};

/// A kernel series the matrix can boot and where apt finds Debian's package of it.
pub struct KernelSeries {
    /// What `--kernel` takes: the series' major.minor version, e.g. `6.1`.
    pub name: &'static str,
    /// The archive whose `linux-image-amd64` is this series.
    pub archive: Archive,
}

/// Where apt looks for a series' kernel.
pub enum Archive {
    /// The machine's own apt sources (a Debian 12 machine's kernel is 6.1).
    MachineSources,
    /// An apt configuration of our own under `.tools/kernels/apt/<name>/`.
    Own {
        /// The folder name, e.g. `bookworm-backports`.
        name: &'static str,
        /// Its `sources.list`.
        sources_list: &'static str,
    },
}

/// The kernels `--kernel` accepts.
pub const SERIES: &[KernelSeries] = &[
    KernelSeries {
        name: "6.1",
        archive: Archive::MachineSources,
    },
    KernelSeries {
        name: "6.12",
        archive: Archive::Own {
            name: "bookworm-backports",
            sources_list: "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                           http://deb.debian.org/debian bookworm-backports main\n",
        },
    },
    KernelSeries {
        name: "5.10",
        archive: Archive::Own {
            name: "bullseye",
            sources_list: "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                           http://deb.debian.org/debian bullseye main\n\
                           deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                           http://deb.debian.org/debian-security bullseye-security main\n",
        },
    },
];

/// A kernel unpacked and ready to boot.
pub struct Kernel {
    /// The Debian package it came from, e.g. `linux-image-6.1.0-57-amd64`.
    pub package: String,
    /// Its release (`uname -r`), e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// `root/boot/vmlinuz-<release>`.
    pub image: PathBuf,
}

fn step(what: &str) {
    eprintln!("[kernels] {what}");
}

fn kernels_dir() -> PathBuf {
    workspace_root().join(".tools").join("kernels")
}

/// The kernel of `series`: the one fetched before, else the archive's current one, fetched,
/// unpacked and indexed now.
pub fn ensure(series: &KernelSeries) -> Result<Kernel> {
    let dir = kernels_dir();
    let root = dir.join("root");
    let record = dir.join(format!("{}.fetched", series.name));
    if let Some(kernel) = fetched_before(&record, &root)? {
        step(&format!(
            "{}: {} is unpacked (delete {} to fetch the archive's current one)",
            series.name,
            kernel.package,
            record.display()
        ));
        return Ok(kernel);
    }
    let apt = AptConfig::for_archive(&series.archive, &dir)?;
    let package = apt.kernel_package()?;
    step(&format!(
        "{}: fetching {package} from {}",
        series.name,
        apt.describe()
    ));
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    let deb = apt.download(&package, &debs)?;
    let release = release_in(&deb)?;
    if !release.starts_with(&format!("{}.", series.name)) {
        bail!(
            "{} holds kernel {release}, not a {} kernel: {} does not give this series",
            deb.display(),
            series.name,
            apt.describe()
        );
    }
    step(&format!(
        "{}: unpacking {} into {}",
        series.name,
        deb.display(),
        root.display()
    ));
    fs::create_dir_all(&root)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    run(Command::new("depmod").arg("-b").arg(&root).arg(&release)).context(
        "`depmod` failed (it is in Debian's kmod package, which `cargo xtask test --kernel` \
         installs)",
    )?;
    let kernel = Kernel {
        image: root.join("boot").join(format!("vmlinuz-{release}")),
        package,
        release,
    };
    if !kernel.image.exists() {
        bail!("{} has no {}", deb.display(), kernel.image.display());
    }
    fs::write(
        &record,
        format!("package={}\nrelease={}\n", kernel.package, kernel.release),
    )?;
    Ok(kernel)
}

/// The kernel `record` names, if it and its unpacked files are all there.
fn fetched_before(record: &Path, root: &Path) -> Result<Option<Kernel>> {
    let Ok(text) = fs::read_to_string(record) else {
        return Ok(None);
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let (Some(package), Some(release)) = (field("package"), field("release")) else {
        bail!(
            "{} is not what this xtask writes; delete it",
            record.display()
        );
    };
    let image = root.join("boot").join(format!("vmlinuz-{release}"));
    let modules_index = root.join("lib/modules").join(&release).join("modules.dep");
    if !image.exists() || !modules_index.exists() {
        return Ok(None);
    }
    Ok(Some(Kernel {
        package,
        release,
        image,
    }))
}

/// apt, with the machine's configuration or one of our own.
struct AptConfig {
    /// `-o` options that point apt at our own configuration (none for the machine's).
    options: Vec<String>,
    /// For messages: which archive this is.
    archive: String,
}

impl AptConfig {
    /// Makes the configuration's folders and updates its package lists (ours, or the
    /// machine's, so that the package named is one the archive still has).
    fn for_archive(archive: &Archive, kernels_dir: &Path) -> Result<Self> {
        let config = match archive {
            Archive::MachineSources => Self {
                options: Vec::new(),
                archive: "the machine's apt sources".to_owned(),
            },
            Archive::Own { name, sources_list } => {
                let dir = kernels_dir.join("apt").join(name);
                fs::create_dir_all(dir.join("lists/partial"))?;
                fs::create_dir_all(dir.join("cache/archives/partial"))?;
                let sources = dir.join("sources.list");
                fs::write(&sources, sources_list)
                    .with_context(|| format!("writing {}", sources.display()))?;
                let path = |p: &str| dir.join(p).display().to_string();
                Self {
                    options: vec![
                        format!("Dir::Etc::SourceList={}", sources.display()),
                        "Dir::Etc::SourceParts=/dev/null".to_owned(),
                        format!("Dir::State::Lists={}", path("lists")),
                        format!("Dir::Cache={}", path("cache")),
                    ],
                    archive: format!("Debian {name}"),
                }
            }
        };
        step(&format!("updating the package lists of {}", config.archive));
        run(config.command("apt-get").args(["update", "-q"])).with_context(|| {
            format!(
                "`apt-get update` for {} failed; it needs deb.debian.org",
                config.archive
            )
        })?;
        Ok(config)
    }

    fn describe(&self) -> &str {
        &self.archive
    }

    /// `program` (`apt-get`, `apt-cache`) with this configuration's options.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for option in &self.options {
            cmd.arg("-o").arg(option);
        }
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    /// The versioned image package `linux-image-amd64` depends on in this archive.
    fn kernel_package(&self) -> Result<String> {
        let show = output_of(self.command("apt-cache").args([
            "show",
            "--no-all-versions",
            "linux-image-amd64",
        ]))
        .with_context(|| format!("{} has no linux-image-amd64", self.archive))?;
        show.lines()
            .find_map(|l| l.strip_prefix("Depends:"))
            .and_then(|deps| {
                deps.split([',', '|'])
                    .filter_map(|d| d.split_whitespace().next())
                    .find(|d| d.starts_with("linux-image-"))
            })
            .map(str::to_owned)
            .with_context(|| {
                format!(
                    "linux-image-amd64 in {} depends on no linux-image-* package:\n{show}",
                    self.archive
                )
            })
    }

    /// Downloads `package` into `debs` unless it is there; returns the `.deb`.
    fn download(&self, package: &str, debs: &Path) -> Result<PathBuf> {
        if let Some(deb) = deb_of(package, debs)? {
            return Ok(deb);
        }
        run(self
            .command("apt-get")
            // The download goes to `debs`, which apt's sandbox user cannot write to.
            .args(["-o", "APT::Sandbox::User=root", "download", "-q", package])
            .current_dir(debs))
        .with_context(|| format!("`apt-get download {package}` failed"))?;
        deb_of(package, debs)?.with_context(|| {
            format!(
                "apt-get downloaded no {package}_*.deb into {}",
                debs.display()
            )
        })
    }
}

/// The `.deb` of `package` in `debs`, if there is one.
fn deb_of(package: &str, debs: &Path) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(debs).with_context(|| format!("reading {}", debs.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(debs.join(&*name)));
        }
    }
    Ok(None)
}

/// The kernel release whose image `deb` holds (`./boot/vmlinuz-<release>`).
fn release_in(deb: &Path) -> Result<String> {
    let listing = output_of(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    listing
        .lines()
        .find_map(|l| l.split_whitespace().last()?.strip_prefix("./boot/vmlinuz-"))
        .map(str::to_owned)
        .with_context(|| format!("{} holds no ./boot/vmlinuz-*", deb.display()))
}
