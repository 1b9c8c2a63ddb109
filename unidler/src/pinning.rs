//! A datapath that outlives the agent (`--pin-dir`): its maps and its links pinned in a
//! directory on a BPF file system.
//!
//! ```text
//! DIR/maps/VIPS, DIR/maps/EVENTS, ...      one pin per map (by its name in the object)
//! DIR/links/tc@veth1234, DIR/links/xdp@eth0 one pin per attachment (hook@interface)
//! ```
//!
//! A pinned link stays attached when the agent exits or dies; a pinned map keeps its contents.
//! The next agent with the same directory adopts both: it loads its programs with the pinned
//! maps (a map whose shape differs from what the program expects is re-created, and said so),
//! and swaps its own program into each pinned link atomically (`BPF_LINK_UPDATE`): no moment
//! without a program on the interface. [`remove`] (`unidler detach`) unpins everything, which
//! detaches the links.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use aya::maps::{MapInfo, MapType};

/// `statfs` magic of a BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// bpf(2) commands used here (`include/uapi/linux/bpf.h`).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// The shape a map must have for the program: type, key and value sizes, capacity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapShape {
    /// The map's type.
    pub map_type: MapType,
    /// Key size in bytes (0 for ring buffers).
    pub key_size: u32,
    /// Value size in bytes (0 for ring buffers).
    pub value_size: u32,
    /// Entries (bytes for ring buffers).
    pub max_entries: u32,
}

/// What became of a pinned map when the agent started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapFate {
    /// Kept, with its contents.
    Adopted,
    /// Not pinned yet: created and pinned.
    Created,
    /// Pinned with another shape (an agent of another version, another `--max-vips`):
    /// unpinned and created anew, empty. Says what differed.
    Recreated(String),
}

/// The pin directory, held exclusively (an `flock` on it) while a clone of this lives: two
/// agents on one directory would read the same rings, and report and replay everything twice.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
    _lock: std::sync::Arc<OwnedFd>,
}

impl PinDir {
    /// Opens (creating it if needed) `root`, which must be on a BPF file system.
    pub fn open(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root.join("maps"))?;
        std::fs::create_dir_all(root.join("links"))?;
        let path = CString::new(root.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: a zeroed statfs is valid; statfs writes it.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a valid out pointer.
        if unsafe { libc::statfs(path.as_ptr(), &mut fs) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if fs.f_type as i64 != BPF_FS_MAGIC {
            return Err(io::Error::other(format!(
                "{} is not on a BPF file system (mount one: mount -t bpf bpf /sys/fs/bpf)",
                root.display()
            )));
        }
        let dir = std::fs::File::open(root)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) => io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is in use by another unidler (one agent per pin directory: stop it \
                         first)",
                        root.display()
                    ),
                ),
                _ => err,
            });
        }
        Ok(Self {
            root: root.to_owned(),
            _lock: std::sync::Arc::new(dir.into()),
        })
    }

    /// Where map `name` is pinned.
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    /// Where the attachment of `hook` (its name) to `iface` is pinned.
    pub fn link_path(&self, hook: &str, iface: &str) -> PathBuf {
        self.root.join("links").join(format!("{hook}@{iface}"))
    }

    /// Checks the layout version of the pinned maps (see [`unidler_common::LAYOUT_VERSION`])
    /// against `version`: if maps are pinned with another one, or with none (agents before
    /// versions), unpins them all, so that loading creates them anew, and says why.
    pub fn check_layout(&self, version: u32) -> io::Result<Option<String>> {
        let pinned: Vec<PathBuf> = std::fs::read_dir(self.root.join("maps"))?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<io::Result<_>>()?;
        if pinned.is_empty() {
            return Ok(None);
        }
        let why = match self.layout_version() {
            Ok(Some(found)) if found == version => return Ok(None),
            Ok(Some(found)) => format!("layout version {found}, this agent's is {version}"),
            Ok(None) => format!("no layout version (an older agent), this agent's is {version}"),
            Err(e) => format!("layout version unreadable ({e}), this agent's is {version}"),
        };
        for path in pinned {
            std::fs::remove_file(path)?;
        }
        Ok(Some(why))
    }

    /// The layout version the pinned `LAYOUT` map holds, if it is pinned.
    pub fn layout_version(&self) -> io::Result<Option<u32>> {
        Ok(self.layout_map()?.map(|map| map.get(&0, 0).unwrap_or(0)))
    }

    /// Writes `version` into the pinned `LAYOUT` map (a test's way to leave maps of another
    /// version; the datapath writes its own when it loads).
    pub fn write_layout_version(&self, version: u32) -> io::Result<()> {
        let mut map = self
            .layout_map()?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no pinned LAYOUT map"))?;
        map.set(0, version, 0).map_err(io::Error::other)
    }

    fn layout_map(&self) -> io::Result<Option<aya::maps::Array<aya::maps::MapData, u32>>> {
        let path = self.map_path(unidler_common::map_names::LAYOUT);
        if !path.exists() {
            return Ok(None);
        }
        let data = aya::maps::MapData::from_pin(&path).map_err(io::Error::other)?;
        aya::maps::Array::try_from(aya::maps::Map::Array(data))
            .map(Some)
            .map_err(io::Error::other)
    }

    /// Checks the pinned map `name` against `shape`: kept if it matches, unpinned if not (so
    /// that loading creates it anew).
    pub fn prepare_map(&self, name: &str, shape: MapShape) -> io::Result<MapFate> {
        let path = self.map_path(name);
        if !path.exists() {
            return Ok(MapFate::Created);
        }
        let differs = match MapInfo::from_pin(&path) {
            Ok(info) => {
                let found = (
                    info.map_type().ok(),
                    info.key_size(),
                    info.value_size(),
                    info.max_entries(),
                );
                let wanted = (
                    Some(shape.map_type),
                    shape.key_size,
                    shape.value_size,
                    shape.max_entries,
                );
                (found != wanted).then(|| format!("pinned {found:?}, the program needs {wanted:?}"))
            }
            Err(e) => Some(format!("unreadable pin: {e}")),
        };
        match differs {
            None => Ok(MapFate::Adopted),
            Some(why) => {
                std::fs::remove_file(&path)?;
                Ok(MapFate::Recreated(why))
            }
        }
    }

    /// The pinned attachments, as (hook name, interface, pin path).
    pub fn links(&self) -> io::Result<Vec<(String, String, PathBuf)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.root.join("links"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((hook, iface)) = name.split_once('@') {
                out.push((hook.to_owned(), iface.to_owned(), entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Unpins every link (detaching it, once no process holds it) and map in `root`, and removes
/// the directory. Returns the interfaces whose attachments were removed.
pub fn remove(root: &Path) -> io::Result<Vec<String>> {
    let dir = PinDir::open(root)?;
    let mut detached = Vec::new();
    for (hook, iface, path) in dir.links()? {
        std::fs::remove_file(&path)?;
        detached.push(format!("{iface} ({hook})"));
    }
    for entry in std::fs::read_dir(root.join("maps"))? {
        std::fs::remove_file(entry?.path())?;
    }
    std::fs::remove_dir(root.join("links"))?;
    std::fs::remove_dir(root.join("maps"))?;
    std::fs::remove_dir(root)?;
    Ok(detached)
}

/// The `bpf_attr` of `BPF_OBJ_GET`.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

impl ObjAttr {
    fn new(path: &CString, fd: u32) -> Self {
        Self {
            pathname: path.as_ptr() as u64,
            bpf_fd: fd,
            file_flags: 0,
            path_fd: 0,
            _pad: 0,
        }
    }
}

/// Opens a pinned BPF object.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let fd = bpf(BPF_OBJ_GET, &ObjAttr::new(&path, 0))?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The interface a link is attached to (XDP and TCX links), 0 if it is attached to none any
/// more (its interface was deleted).
pub fn link_ifindex(link: BorrowedFd<'_>) -> io::Result<u32> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then a union aligned to 8 whose XDP
    // and TCX members both start with the ifindex.
    let mut info = [0u8; 64];
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = GetInfo {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(u32::from_ne_bytes([info[16], info[17], info[18], info[19]]))
}

/// Swaps `program` into `link` atomically (`BPF_LINK_UPDATE`).
pub fn update_link(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &attr).map(|_| ())
}

/// The `bpf` system call with attribute struct `attr`; the kernel's error as an `io::Error`.
pub(crate) fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<i32> {
    // SAFETY: `attr` is a valid, initialised attribute struct of the size passed; the kernel
    // reads it (and writes only through pointers inside it that point to our buffers).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as i32)
    }
}

/// An attachment held by its pin: dropping it leaves the link attached; [`PinnedAttachment::
/// unpin`] detaches it.
#[derive(Debug)]
pub struct PinnedAttachment {
    fd: OwnedFd,
    path: PathBuf,
}

impl PinnedAttachment {
    /// The pinned link at `path`, opened.
    pub fn open(path: PathBuf) -> io::Result<Self> {
        Ok(Self {
            fd: open_pinned(&path)?,
            path,
        })
    }

    /// The link's file descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Removes the pin: the link detaches once this (the last holder) is dropped.
    pub fn unpin(self) -> io::Result<()> {
        std::fs::remove_file(&self.path)
    }
}
