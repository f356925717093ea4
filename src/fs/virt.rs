//! The read-only `.membridge/` directory: live state rendered on open.
//!
//! It lives only in the mount (never in the backing dir, never in the bucket), so
//! tools and the Claude CLI wrapper can read the daemon's state with `cat`.

use std::ffi::OsStr;
use std::time::SystemTime;

use fuser::{FileAttr, FileType, INodeNo};

pub const DIR_NAME: &str = ".membridge";
/// Virtual node ids sit far above any id the inode table hands out.
pub const VIRT_DIR_INO: u64 = 1 << 62;

/// What the daemon publishes in `.membridge/`; the filesystem only renders it.
pub trait VirtualFiles: Send + Sync {
    /// File names, in listing order.
    fn names(&self) -> &'static [&'static str];
    /// Current content of a file; rendered once per open so a reader sees one state.
    fn content(&self, name: &str) -> Option<Vec<u8>>;
}

impl dyn VirtualFiles {
    fn index(&self, ino: u64) -> Option<&'static str> {
        let i = ino.checked_sub(VIRT_DIR_INO + 1)? as usize;
        self.names().get(i).copied()
    }

    pub fn entries(&self) -> Vec<(&'static str, u64)> {
        self.names()
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, VIRT_DIR_INO + 1 + i as u64))
            .collect()
    }

    pub fn dir_attr(&self) -> FileAttr {
        base_attr(VIRT_DIR_INO, FileType::Directory, 0o555, 0)
    }

    pub fn attr(&self, ino: u64) -> Option<FileAttr> {
        if ino == VIRT_DIR_INO {
            return Some(self.dir_attr());
        }
        let name = self.index(ino)?;
        let size = self.content(name).map(|c| c.len()).unwrap_or(0);
        Some(base_attr(ino, FileType::RegularFile, 0o444, size as u64))
    }

    pub fn lookup(&self, name: &OsStr) -> Option<FileAttr> {
        let (_, ino) = self
            .entries()
            .into_iter()
            .find(|(n, _)| OsStr::new(n) == name)?;
        self.attr(ino)
    }

    pub fn render(&self, ino: u64) -> Option<Vec<u8>> {
        self.content(self.index(ino)?)
    }
}

fn base_attr(ino: u64, kind: FileType, perm: u16, size: u64) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}
