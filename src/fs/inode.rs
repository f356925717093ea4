//! The inode table: FUSE node ids mapped to `O_PATH` fds of the backing files.
//!
//! Holding an `O_PATH` fd per looked-up inode (as libfuse's passthrough_ll does)
//! keeps each node pinned to its backing file across renames, so no path has to be
//! rewritten when a directory moves. The table also remembers one name per node,
//! because path classes (replicated or local) are decided by path.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::class::PathClass;

pub const ROOT: u64 = 1;

pub struct Inode {
    pub ino: u64,
    fd: OwnedFd,
    /// Backing (st_dev, st_ino): the same file looked up twice is one node.
    key: (u64, u64),
    pub is_dir: bool,
    pub is_symlink: bool,
    nlookup: AtomicU64,
    /// (parent node, name) of the last name this node was seen under.
    loc: Mutex<(u64, OsString)>,
    class: RwLock<Arc<PathClass>>,
}

impl Inode {
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Cheap to call on every read and write: one lock and a refcount.
    pub fn class(&self) -> Arc<PathClass> {
        self.class.read().unwrap().clone()
    }

    pub fn location(&self) -> (u64, OsString) {
        self.loc.lock().unwrap().clone()
    }
}

#[derive(Default)]
struct Maps {
    by_ino: HashMap<u64, Arc<Inode>>,
    by_key: HashMap<(u64, u64), u64>,
}

pub struct InodeTable {
    maps: RwLock<Maps>,
    next: AtomicU64,
}

impl InodeTable {
    pub fn new(root_fd: OwnedFd, root_key: (u64, u64)) -> InodeTable {
        let root = Arc::new(Inode {
            ino: ROOT,
            fd: root_fd,
            key: root_key,
            is_dir: true,
            is_symlink: false,
            nlookup: AtomicU64::new(2),
            loc: Mutex::new((ROOT, OsString::new())),
            class: RwLock::new(Arc::new(PathClass::Local)),
        });
        let mut maps = Maps::default();
        maps.by_key.insert(root_key, ROOT);
        maps.by_ino.insert(ROOT, root);
        InodeTable {
            maps: RwLock::new(maps),
            next: AtomicU64::new(ROOT + 1),
        }
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.maps.read().unwrap().by_ino.get(&ino).cloned()
    }

    /// Register one more kernel reference to the file behind `fd` (just opened
    /// `O_PATH` under `parent`/`name`), creating its node if it is new.
    pub fn remember(
        &self,
        fd: OwnedFd,
        st: &libc::stat,
        parent: u64,
        name: &OsStr,
        class: PathClass,
    ) -> Arc<Inode> {
        let key = (st.st_dev, st.st_ino);
        let mut maps = self.maps.write().unwrap();
        if let Some(ino) = maps.by_key.get(&key) {
            let node = maps.by_ino[ino].clone();
            node.nlookup.fetch_add(1, Ordering::Relaxed);
            *node.loc.lock().unwrap() = (parent, name.to_os_string());
            *node.class.write().unwrap() = Arc::new(class);
            return node; // `fd` is a duplicate: dropped (closed) here
        }
        let ino = self.next.fetch_add(1, Ordering::Relaxed);
        let fmt = st.st_mode & libc::S_IFMT;
        let node = Arc::new(Inode {
            ino,
            fd,
            key,
            is_dir: fmt == libc::S_IFDIR,
            is_symlink: fmt == libc::S_IFLNK,
            nlookup: AtomicU64::new(1),
            loc: Mutex::new((parent, name.to_os_string())),
            class: RwLock::new(Arc::new(class)),
        });
        maps.by_key.insert(key, ino);
        maps.by_ino.insert(ino, node.clone());
        node
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut maps = self.maps.write().unwrap();
        let Some(node) = maps.by_ino.get(&ino) else {
            return;
        };
        let prev = node.nlookup.load(Ordering::Relaxed);
        let left = prev.saturating_sub(n);
        node.nlookup.store(left, Ordering::Relaxed);
        if left == 0 {
            let key = node.key;
            maps.by_ino.remove(&ino);
            if maps.by_key.get(&key) == Some(&ino) {
                maps.by_key.remove(&key);
            }
        }
    }

    /// After a rename: the node keeps its fd, only its name (and so class) changes.
    pub fn relocate(&self, ino: u64, parent: u64, name: &OsStr, class: PathClass) {
        if let Some(node) = self.get(ino) {
            *node.loc.lock().unwrap() = (parent, name.to_os_string());
            *node.class.write().unwrap() = Arc::new(class);
        }
    }

    /// The node of a backing file, if the kernel holds one (renames relocate it).
    pub fn by_key(&self, st: &libc::stat) -> Option<Arc<Inode>> {
        let maps = self.maps.read().unwrap();
        let ino = maps.by_key.get(&(st.st_dev, st.st_ino))?;
        maps.by_ino.get(ino).cloned()
    }

    /// Path of `ino` relative to the mount root, by walking recorded parents.
    pub fn rel_path(&self, ino: u64) -> Option<PathBuf> {
        let mut parts = Vec::new();
        let mut cur = ino;
        let maps = self.maps.read().unwrap();
        for _ in 0..4096 {
            if cur == ROOT {
                let mut p = PathBuf::new();
                for part in parts.iter().rev() {
                    p.push(part);
                }
                return Some(p);
            }
            let node = maps.by_ino.get(&cur)?;
            let (parent, name) = node.loc.lock().unwrap().clone();
            parts.push(name);
            cur = parent;
        }
        None
    }
}
