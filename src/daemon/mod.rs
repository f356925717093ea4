//! The mount daemon's lifecycle: background start, readiness, signals, shutdown.
//!
//! `membridge mount` without `--foreground` re-executes itself in the foreground
//! as a new session leader with its output sent to the log file, and waits on a
//! pipe until the child reports the mount usable (or why it failed), so the
//! command's exit status tells the truth and a script can use the mount at once.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};

use std::sync::atomic::AtomicU64;

use crate::config::Config;
use crate::fs::class::Classifier;
use crate::fs::{mount, PassthroughFs};
use crate::journal::Journal;
use crate::lease::{Heartbeat, HeartbeatTask, KeeperOptions, LeaseClient, LeaseKeeper, LeaseState};
use crate::remote::{ObjectStore, S3Options, S3Store};
use crate::replica::apply::Applier;
use crate::replica::capture::Capture;
use crate::replica::capture::Durability;
use crate::replica::follower::Follower;
use crate::replica::hydrate::ReadThrough;
use crate::replica::node::{Node, Role};
use crate::replica::roles::drive_roles;
use crate::replica::uploader::{
    Command as UploaderCommand, Policy as UploadPolicy, UploadError, UploadSettings, UploadShared,
    Uploader,
};
use crate::status::Status;

const READY_FD_ENV: &str = "MEMBRIDGE_READY_FD";

pub struct MountArgs {
    pub dir: PathBuf,
    pub foreground: bool,
    pub threads: usize,
    /// Kernel passthrough where available (`MEMBRIDGE_PASSTHROUGH=off`: never).
    pub passthrough: bool,
    /// When a commit is acknowledged (`MEMBRIDGE_DURABILITY`).
    pub durability: Durability,
}

pub fn log_file(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("membridge.log")
}

/// `membridge mount`: in the background unless asked otherwise.
pub fn mount(cfg: &Config, args: &MountArgs) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state dir {}", cfg.state_dir.display()))?;
    if args.foreground || std::env::var_os(READY_FD_ENV).is_some() {
        return run_foreground(cfg, args);
    }
    spawn_background(cfg)
}

fn spawn_background(cfg: &Config) -> Result<()> {
    let log = log_file(cfg);
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening log file {}", log.display()))?;
    let (rd, wr) = nix::unistd::pipe().context("creating readiness pipe")?;
    nix::fcntl::fcntl(
        rd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    let exe = std::env::current_exe().context("locating the membridge binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(READY_FD_ENV, wr.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: the hook runs in the forked child before exec, where only
    // async-signal-safe work is allowed: setsid(2) is, and mapping its Errno to
    // io::Error builds the allocation-free `Os` variant.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the daemon")?;
    drop(wr);
    let mut msg = String::new();
    std::fs::File::from(rd)
        .read_to_string(&mut msg)
        .context("waiting for the daemon")?;
    match msg.trim().strip_prefix("ready ") {
        Some(dir) => {
            println!(
                "membridge: mounted {dir} (pid {}); logs: {}",
                child.id(),
                log.display()
            );
            Ok(())
        }
        None if msg.trim().is_empty() => {
            bail!("the daemon exited before mounting; see {}", log.display())
        }
        None => bail!("{}", msg.trim()),
    }
}

fn tell_parent(msg: &str) {
    if let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        // Adopt the fd at most once: `serve` can report "ready" and later fail,
        // and a second adoption would close (or write into) whatever file has
        // reused the number since.
        static TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if TOLD.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // SAFETY: `spawn_background` set the variable to the write end of the
        // readiness pipe it let this process inherit; nothing else in this
        // process opens, wraps or closes that fd, and TOLD makes this the only
        // adoption, so the File is its sole owner.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        let _ = writeln!(f, "{msg}");
        // dropping `f` closes the pipe: the parent's read ends
    }
}

fn run_foreground(cfg: &Config, args: &MountArgs) -> Result<()> {
    match serve(cfg, args) {
        Ok(()) => Ok(()),
        Err(e) => {
            tell_parent(&format!("error: {e:#}"));
            Err(e)
        }
    }
}

/// Block the shutdown signals in every thread; one thread waits for them.
fn block_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    // `membridge unmount`: close the view's own files on the mount for a
    // moment, so they do not keep it busy.
    set.add(Signal::SIGUSR1);
    let _ = set.thread_block();
    set
}

fn serve(cfg: &Config, args: &MountArgs) -> Result<()> {
    // Before any SQLite connection of ours exists (src/replica/tail/).
    crate::replica::tail::install_lock_lending();
    let signals = block_signals();
    // Bound before the lease or the mount: a port in use stops here, in one line.
    let http = cfg.metrics_addr.map(crate::http::bind).transpose()?;
    let (dir, root_fd) = mount::prepare(&args.dir).map_err(|e| anyhow!(e))?;
    // Hold no directory busy: every path from here on is absolute or fd-relative.
    std::env::set_current_dir("/")?;
    let log = std::env::var_os(READY_FD_ENV).map(|_| log_file(cfg).display().to_string());
    let status = Status::new(cfg.status_identity(&dir, log));
    let site = match http {
        Some(listener) => Some(serve_http(cfg, listener, &status)?),
        None => None,
    };
    let classifier = Classifier::new(&cfg.classes.databases, &cfg.classes.files);
    let replication = start_replication(cfg, &root_fd, &status)?;
    if let Some(site) = &site {
        site.attach(crate::page::Control {
            node: replication.capture.clone(),
            keeper: replication.keeper.clone(),
            lease: LeaseClient::new(&cfg.lease(), replication.store.clone()),
            rt: replication.rt.handle().clone(),
            root: replication.root.try_clone()?,
        });
    }
    let fs = PassthroughFs::new(
        root_fd,
        classifier,
        Arc::new(CaughtUp {
            status: status.clone(),
            capture: replication.capture.capture_handle(),
        }),
        replication.capture.clone(),
        args.passthrough,
        status.io().clone(),
    )?;
    let invalidator = fs.invalidator();
    replication.capture.set_invalidator(invalidator.clone());
    let mut session = mount::mount(fs, &dir, args.threads)
        .with_context(|| format!("mounting {}", dir.display()))?;
    invalidator.attach(session.notifier());
    // Chosen at mount: passthrough where the kernel and our privileges allow
    // it, today's path otherwise (docs/ARCHITECTURE.md, "Passthrough").
    crate::fs::iomode::probe(&session, status.io());
    let mut unmounter = session.unmount_callable();
    // Serve from now on: the view applier and the follower's first poll go
    // through the mount.
    let serving = std::thread::Builder::new()
        .name("fuse".into())
        .spawn(move || session.run())?;

    let backing = PathBuf::from(format!("/proc/self/fd/{}", replication.root.as_raw_fd()));
    let applier = Arc::new(
        Applier::start(&dir, &backing, &cfg.state_dir).context("starting the view applier")?,
    );
    replication.capture.set_applier(applier.clone());
    status.io().set_durability(args.durability.name());
    if args.durability == Durability::Local && status.io().enabled() {
        // Databases in WAL mode are served by the kernel from here on and
        // their commits tailed (docs/ARCHITECTURE.md, "Passthrough").
        let capture = replication.capture.capture_handle();
        let tails = capture.tails().clone();
        tails.set_mount(&dir, status.io().clone(), args.threads);
        let a = applier.clone();
        tails.set_close_own(Box::new(move |db| {
            let _ = a.close(Some(db));
        }));
        crate::replica::tail::spawn(tails, capture).context("starting the WAL tailer")?;
    }
    let tails = replication.capture.capture().tails().clone();
    let first_poll = replication.start_follower(cfg, invalidator, &dir);
    let bucket_answered = matches!(
        replication.keeper.state(),
        LeaseState::HeldBy { .. } | LeaseState::Held { .. }
    );
    if replication.capture.role() != Role::Primary && bucket_answered {
        // A secondary is ready once it serves its databases (at the head,
        // read through from the bucket): wait for the follower's first poll,
        // but not when the bucket did not answer, and never long.
        let _ = replication
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), first_poll).await });
    }
    let views = replication.capture.clone();
    let aside = crate::replica::aside::Checker::start(
        &cfg.state_dir,
        &dir,
        &status,
        Box::new(move |db| views.view_at_head(db)),
    );
    let paused = aside.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match signals.wait() {
                Ok(Signal::SIGUSR1) => {
                    paused.pause(UNMOUNT_PAUSE);
                    tails.pause(UNMOUNT_PAUSE);
                    let _ = applier.pause(UNMOUNT_PAUSE);
                }
                Ok(sig) => {
                    tracing::info!(signal = ?sig, "shutting down: unmounting");
                    paused.pause(UNMOUNT_PAUSE);
                    tails.pause(UNMOUNT_PAUSE);
                    let _ = applier.pause(UNMOUNT_PAUSE);
                    if let Err(e) = unmounter.unmount() {
                        tracing::error!(error = %e, "unmount failed");
                    }
                    return;
                }
                Err(_) => return,
            }
        })?;
    status.update(|s| s.state = "ready".into());
    aside.mounted();
    tracing::info!(dir = %dir.display(), node = %cfg.node_id, canonical_id = %cfg.canonical_id, "mounted");
    tell_parent(&format!("ready {}", dir.display()));
    // After the readiness pipe is closed (the watchdog must not inherit it:
    // `mount` waits for its end), and once the session serves (the
    // watchdog's stat of the mount is answered).
    watchdog::spawn(&dir);
    serving
        .join()
        .map_err(|_| anyhow!("the FUSE session panicked"))?
        .context("FUSE session")?;
    aside.stop();
    tracing::info!(dir = %dir.display(), "unmounted");
    replication.drain(Duration::from_secs(10));
    replication.release_lease();
    Ok(())
}

/// `/metrics` and the status page, from the start (the page's actions wait
/// for replication: [`crate::page::Site::attach`]).
fn serve_http(
    cfg: &Config,
    listener: std::net::TcpListener,
    status: &Status,
) -> Result<Arc<crate::page::Site>> {
    let addr = listener.local_addr()?;
    let site = Arc::new(crate::page::Site::new(&cfg.page(), status.clone())?);
    let handler = site.clone();
    crate::http::serve(listener, Arc::new(move |req| handler.handle(req)))
        .context("starting the metrics server")?;
    tracing::info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
    tracing::info!(%addr, "serving the status page at {}", crate::page::url(addr));
    Ok(site)
}

/// `.membridge/` as of every commit acknowledged before it is read: a commit
/// the kernel served is captured first (docs/ARCHITECTURE.md, "Passthrough").
struct CaughtUp {
    status: Status,
    capture: Arc<crate::replica::capture::Capture>,
}

impl crate::fs::virt::VirtualFiles for CaughtUp {
    fn names(&self) -> &'static [&'static str] {
        self.status.names()
    }

    fn content(&self, name: &str) -> Option<Vec<u8>> {
        self.capture.catch_up();
        self.status.content(name)
    }
}

struct Running {
    capture: Arc<Node>,
    journal: Arc<Journal>,
    wake: Arc<tokio::sync::Notify>,
    keeper: Arc<LeaseKeeper>,
    store: Arc<dyn ObjectStore>,
    status: Status,
    /// A duplicate of the directory fd: the follower's way to the backing files.
    root: std::os::fd::OwnedFd,
    _heartbeat: HeartbeatTask,
    read_through: Arc<ReadThrough>,
    /// Runs the uploader, the lease keeper and the role driver.
    rt: tokio::runtime::Runtime,
}

impl Running {
    /// On a clean shutdown, give the uploader a bounded chance to publish the
    /// backlog; what is left stays in the journal for the next mount.
    fn drain(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let left: u64 = self
                .journal
                .heads()
                .unwrap_or_default()
                .iter()
                .map(|h| self.journal.backlog(&h.name).map(|b| b.0).unwrap_or(0))
                .sum::<u64>()
                + self.capture.capture().files().pending();
            if left == 0 {
                return;
            }
            if start.elapsed() > limit {
                tracing::warn!(
                    transactions = left,
                    "exiting with unpublished transactions: they are uploaded if this node is the \
                     primary again at the next mount; if another node takes over first, they are \
                     set aside under divergent/ instead"
                );
                return;
            }
            self.wake.notify_one();
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The secondary's follower; idle while this node is primary. The
    /// receiver fires after its first poll.
    fn start_follower(
        &self,
        cfg: &Config,
        invalidator: Arc<crate::fs::Invalidator>,
        dir: &Path,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let follower = Follower {
            store: self.store.clone(),
            layout: cfg.layout(),
            canonical_id: cfg.canonical_id.clone(),
            backing: PathBuf::from(format!("/proc/self/fd/{}", self.root.as_raw_fd())),
            mount_dir: dir.to_path_buf(),
            state_dir: cfg.state_dir.clone(),
            node: self.capture.clone(),
            invalidator,
            status: self.status.clone(),
            poll: cfg.poll_interval,
            read_through: self.read_through.clone(),
            journal: self.journal.clone(),
            node_id: cfg.node_id.clone(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.rt.spawn(follower.run(tx));
        rx
    }

    /// Let another node take the lease at once instead of waiting out the TTL,
    /// unless transactions are still unpublished: then the lease is kept (it
    /// expires by itself), so that this node, mounted again in time, publishes
    /// them instead of another node taking over without them.
    fn release_lease(&self) {
        let unpublished = self.capture.capture().unpublished();
        if self.keeper.state().is_held() && unpublished > 0 {
            tracing::warn!(
                transactions = unpublished,
                "not releasing the lease: transactions are unpublished; it expires by itself"
            );
            return;
        }
        if self.keeper.state().is_held() {
            let keeper = self.keeper.clone();
            let res = self.rt.block_on(async move {
                tokio::time::timeout(Duration::from_secs(5), keeper.release()).await
            });
            match res {
                Ok(Ok(())) => tracing::info!("lease released"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "lease not released; it expires by itself")
                }
                Err(_) => tracing::warn!("lease not released in time; it expires by itself"),
            }
        }
    }
}

/// Before taking any role: unpublished transactions the bucket's history has
/// moved past (another node took over before they were uploaded) can never be
/// uploaded. They are written under `divergent/` with a report, and shown (with
/// every report still there) in `status.json`. If the bucket cannot be read
/// now, taking the lease later still refuses to continue such a history.
fn set_aside_divergent(
    cfg: &Config,
    rt: &tokio::runtime::Runtime,
    store: &dyn ObjectStore,
    journal: &Journal,
    status: &Status,
) {
    use crate::replica::divergent;
    let layout = cfg.layout();
    let found = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            divergent::diverged(store, &layout, &cfg.canonical_id, journal),
        )
        .await
        .unwrap_or_else(|_| Err("the bucket did not answer within 10 s".into()))
    });
    match found {
        Ok(found) => {
            for (h, why, bucket_epoch) in found {
                divergent::set_aside(
                    journal,
                    &cfg.state_dir.join("base"),
                    &divergent::dir(&cfg.state_dir),
                    &h,
                    &cfg.node_id,
                    Some(bucket_epoch),
                    &why,
                );
            }
        }
        Err(e) => tracing::warn!(
            error = %e,
            "could not compare unpublished transactions with the bucket at start"
        ),
    }
    // Every set-aside copy not merged or dismissed yet, this run's included.
    let aside = crate::replica::aside::scan(&cfg.state_dir);
    let heads = journal.heads().unwrap_or_default();
    status.update(|s| crate::replica::aside::publish(&aside, s));
    for h in &heads {
        let backlog = journal.backlog(&h.name).map_or(0, |b| b.0);
        status.journaled(&h.name, h.head_txid, h.uploaded_txid, backlog);
    }
}

/// Open the journal, reconcile every replicated database with it (before the
/// mount serves anything), and start the uploader on its own runtime.
fn start_replication(
    cfg: &Config,
    root_fd: &std::os::fd::OwnedFd,
    status: &Status,
) -> Result<Running> {
    let journal = Arc::new(
        Journal::open(&cfg.state_dir.join("journal.db")).context("opening the local journal")?,
    );
    // Until a lease says otherwise, transactions carry the epoch they were
    // last written under (recovery at mount captures the last run's tail).
    let epoch = Arc::new(AtomicU64::new(journal.last_epoch()?));
    let wake = Arc::new(tokio::sync::Notify::new());
    let base_dir = cfg.state_dir.join("base");
    let capture = Arc::new(Capture::new(
        root_fd.try_clone()?,
        journal.clone(),
        base_dir.clone(),
        epoch.clone(),
        wake.clone(),
        status.clone(),
    ));
    capture
        .files()
        .configure(&cfg.classes.databases, &cfg.classes.files);
    let mut names: Vec<String> = journal.heads()?.into_iter().map(|h| h.name).collect();
    let root = format!("/proc/self/fd/{}/", root_fd.as_raw_fd());
    for pattern in &cfg.classes.databases {
        for path in glob::glob(&format!("{root}{pattern}"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(rel) = path.to_str().and_then(|p| p.strip_prefix(&root)) {
                names.push(rel.to_string());
            }
        }
    }
    names.sort();
    names.dedup();
    for db in &names {
        if let Err(e) = capture.recover(db) {
            // The mount still comes up; writes to this database fail until fixed.
            tracing::error!(db = %db, error = %e, "cannot replicate this database");
            status.update(|s| s.last_error = Some(e.to_string()));
        }
    }
    let store: Arc<dyn ObjectStore> = Arc::new(S3Store::new(&cfg.s3, S3Options::default()));
    let disabled = cfg.policy == crate::config::Policy::Disabled;
    if disabled {
        tracing::warn!(
            "LEADERSHIP_ENABLED=0: this node writes without a lease; you guarantee there is no other writer"
        );
    }
    let node = Arc::new(Node::new(
        &cfg.node_id,
        capture.clone(),
        if disabled {
            Role::Primary
        } else {
            Role::Secondary
        },
        status.clone(),
    ));
    let uploader = Uploader::new(
        UploadSettings {
            project_id: cfg.project_id.clone(),
            canonical_id: cfg.canonical_id.clone(),
            node_id: cfg.node_id.clone(),
            policy: UploadPolicy {
                retention: cfg.retention,
                snapshot_txns: cfg.snapshot_txns,
                ..UploadPolicy::default()
            },
        },
        store.clone(),
        UploadShared {
            journal: journal.clone(),
            base_dir,
            epoch: epoch.clone(),
            wake: wake.clone(),
            status: status.clone(),
            node: node.clone(),
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("membridge-io")
        .enable_all()
        .build()?;
    let read_through = ReadThrough::new(
        store.clone(),
        rt.handle().clone(),
        status.clone(),
        cfg.cache_bytes,
    );
    node.set_read_through(read_through.clone());
    set_aside_divergent(cfg, &rt, store.as_ref(), &journal, status);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (fenced_tx, fenced_rx) = tokio::sync::mpsc::unbounded_channel();
    rt.spawn(uploader.run(rx, fenced_tx));
    let primary_now = node.clone();
    rt.spawn(
        crate::coexist::LegacyWatch {
            store: store.clone(),
            layout: cfg.layout(),
            project_id: cfg.project_id.clone(),
            canonical_id: cfg.canonical_id.clone(),
            node_id: cfg.node_id.clone(),
            journal: journal.clone(),
            base_dir: cfg.state_dir.join("base"),
            state_dir: cfg.state_dir.clone(),
            status: status.clone(),
            is_primary: Box::new(move || primary_now.role() == Role::Primary),
            refresh: cfg.legacy_refresh,
        }
        .run(),
    );
    let keeper = Arc::new(rt.block_on(async {
        LeaseKeeper::spawn(
            LeaseClient::new(&cfg.lease(), store.clone()),
            KeeperOptions::for_ttl(cfg.lease_ttl),
        )
    }));
    serve_control(
        control_socket(cfg),
        tx.clone(),
        node.clone(),
        keeper.clone(),
        status.clone(),
        cfg.poll_interval,
    )?;
    // Mount with the role settled when the bucket answers quickly, so a lone
    // node is writable from its first request.
    rt.block_on(async {
        let mut states = keeper.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while matches!(*states.borrow_and_update(), LeaseState::None) {
                if states.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
    });
    rt.spawn(crate::replica::roles::follow_closely(
        node.clone(),
        keeper.handover_pending(),
    ));
    let roles = rt.spawn(drive_roles(
        node.clone(),
        keeper.clone(),
        epoch,
        tx,
        fenced_rx,
        status.clone(),
    ));
    rt.block_on(async {
        let t = Instant::now();
        while !roles.is_finished()
            && matches!(keeper.state(), LeaseState::Held { .. })
            && node.role() != Role::Primary
            && t.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let heartbeat = {
        let _guard = rt.enter();
        let (status, node) = (status.clone(), node.clone());
        HeartbeatTask::spawn_nudged(
            store.clone(),
            cfg.layout(),
            crate::lease::DEFAULT_HEARTBEAT_INTERVAL,
            node.role_changes(),
            move || {
                let s = status.snapshot();
                let role = node.role();
                // What this node holds: its own head on a primary, what it
                // applied elsewhere (a secondary's head_txid is the bucket's).
                let holds_head = matches!(role, Role::Primary | Role::HandingOver);
                Heartbeat {
                    node_id: s.node_id.clone(),
                    role: role.name().into(),
                    epoch: s.epoch,
                    applied_txid: s
                        .databases
                        .values()
                        .map(|d| {
                            if holds_head {
                                d.head_txid
                            } else {
                                d.applied_txid
                            }
                        })
                        .max()
                        .unwrap_or(0),
                    head_txid: s.databases.values().map(|d| d.head_txid).max(),
                    // A primary is the source; a lag measured before its
                    // promotion would linger otherwise.
                    lag_seconds: s
                        .databases
                        .values()
                        .filter_map(|d| d.lag_seconds)
                        .reduce(f64::max)
                        .filter(|_| !holds_head),
                    version: s.version.clone(),
                    last_seen: chrono::Utc::now(),
                    mount_dir: s.mount_dir.clone(),
                    session: None,
                    last_write: node.last_write().filter(|_| holds_head),
                    primary_since: node.primary_since(),
                    extra: Default::default(),
                }
            },
        )
    };
    Ok(Running {
        capture: node,
        journal,
        wake,
        keeper,
        store,
        status: status.clone(),
        root: root_fd.try_clone()?,
        _heartbeat: heartbeat,
        read_through,
        rt,
    })
}

mod control;
mod unmount;
pub mod watchdog;

use unmount::UNMOUNT_PAUSE;
pub use unmount::{read_status, unmount};

pub use control::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::uploader::Conflict;

    /// What the daemon writes is what the CLI reads: each kind of reply
    /// keeps its message and maps to its exit code.
    #[test]
    fn control_replies_round_trip_through_the_wire() {
        let code = |e: ControlError| {
            let err = parse_reply(&e.wire()).unwrap_err();
            let refused = err.downcast_ref::<Refused>().map(|r| r.code);
            (refused, err.to_string())
        };
        let primary = ControlError::Refused {
            on_primary: true,
            message: "this node is the primary".into(),
        };
        assert_eq!(code(primary), (Some(2), "this node is the primary".into()));
        let push = ControlError::from_push(UploadError::Refused("this node is a secondary".into()));
        assert_eq!(code(push), (Some(3), "this node is a secondary".into()));
        let failed = ControlError::from_push(Conflict::ManifestVanished.into());
        assert_eq!(failed, ControlError::Failed("manifest vanished".into()));
        assert_eq!(code(failed), (None, "manifest vanished".into()));
        assert_eq!(parse_reply("ok caught up").unwrap(), "caught up");
        assert!(parse_reply("garbage").is_err());
    }
}
