//! membridge CLI: parse, load config, dispatch. Exit codes follow the old tool:
//! 0 ok, 1 error, 2 refused on the primary, 3 refused on a secondary; and
//! `doctor` exits 4 when the node works but is degraded (STATUS: DEGRADED).
//!
//! Over 800 lines on purpose: the argument definitions and one short function
//! per subcommand, each only wiring (load the configuration, build the
//! module's settings, call it, map its outcome to an exit code), kept in one
//! place so the whole command line reads top to bottom. The work is in the
//! library; what a subcommand prints is in `membridge::cli`.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use membridge::config::{self, Config, Layers};
use membridge::daemon;
use membridge::replica::capture::Durability;

/// Why `--durability bucket` does not mount (docs/ARCHITECTURE.md, "Durability").
const BUCKET_DURABILITY: &str = "--durability bucket (MEMBRIDGE_DURABILITY=bucket) is not available in this \
version: a commit that timed out waiting for the bucket cannot yet be taken back safely once its upload \
was attempted (docs/ARCHITECTURE.md, \"Durability\"). Use --durability local (the default): commits \
are on this disk when acknowledged and published within about a second.";

#[derive(Parser)]
#[command(
    name = "membridge",
    version,
    about = "Replicate ~/.claude-mem through S3, transaction by transaction"
)]
struct Cli {
    /// Config file (default ~/.claude-mem-minio/config.env; only read, never written)
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// S3 endpoint URL (MINIO_ENDPOINT)
    #[arg(long, global = true)]
    endpoint: Option<String>,
    /// Bucket (MINIO_BUCKET)
    #[arg(long, global = true)]
    bucket: Option<String>,
    /// Project id (CLAUDE_PROJECT_ID)
    #[arg(long, global = true)]
    project: Option<String>,
    /// This node's id (MEMBRIDGE_NODE_ID)
    #[arg(long, global = true)]
    node_id: Option<String>,
    /// State directory root (MEMBRIDGE_STATE_DIR)
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Any config key, e.g. `-o MEMBRIDGE_POLL_MS=500` (repeatable)
    #[arg(short = 'o', long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics from the mount
    /// daemon (MEMBRIDGE_METRICS_ADDR), e.g. 127.0.0.1:9464
    #[arg(long, global = true, value_name = "ADDR:PORT")]
    metrics_addr: Option<String>,
    /// Log format of the daemon: text, or one JSON object per line
    #[arg(
        long,
        global = true,
        value_enum,
        env = "MEMBRIDGE_LOG_FORMAT",
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount in place over DIR (default ~/.claude-mem)
    Mount {
        dir: Option<PathBuf>,
        /// Stay in the foreground and log to stderr
        #[arg(long)]
        foreground: bool,
        /// FUSE worker threads
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Kernel passthrough for paths the daemon need not see: `auto`
        /// (where the kernel and privileges allow) or `off`
        #[arg(long, env = "MEMBRIDGE_PASSTHROUGH", default_value = "auto", value_parser = ["auto", "off"])]
        passthrough: String,
        /// When a commit is acknowledged: `local` (on this disk, shipped
        /// within about a second) or `bucket` (once it is in the bucket)
        #[arg(long, env = "MEMBRIDGE_DURABILITY", default_value = "local", value_parser = ["local", "bucket"])]
        durability: String,
    },
    /// Unmount DIR and wait for the daemon to finish
    Unmount {
        dir: Option<PathBuf>,
        /// Detach now even if files are open; the daemon exits when they close
        #[arg(long)]
        lazy: bool,
    },
    /// Show the mounted daemon's state
    Status {
        dir: Option<PathBuf>,
        /// Print status.json as is
        #[arg(long)]
        json: bool,
    },
    /// Publish the backlog and a snapshot now (primary; exit 3 on a secondary)
    Push,
    /// Wait until this secondary has applied the bucket's head (exit 2 on the primary)
    Pull,
    /// Rebuild a database from the bucket at the head, a txid or a time
    Restore {
        /// Database path relative to the mount, e.g. claude-mem.db
        #[arg(long)]
        db: String,
        /// File to write (atomically)
        #[arg(long)]
        to: PathBuf,
        #[arg(long, conflicts_with = "time")]
        txid: Option<u64>,
        /// RFC 3339 time, e.g. 2026-11-23T10:00:00Z
        #[arg(long)]
        time: Option<String>,
        /// Replace FILE if it exists (and remove its -wal, -shm, -journal)
        #[arg(long)]
        force: bool,
    },
    /// Check config, bucket, lease, mount, databases, replication and what is
    /// installed; ends with STATUS: OK (exit 0), DEGRADED (4) or ERROR (1)
    Doctor {
        /// The mount directory (default ~/.claude-mem)
        dir: Option<PathBuf>,
        /// Create the bucket first if it does not exist (first set-up)
        #[arg(long)]
        create_bucket: bool,
    },
    /// Show, hand over or release the primary's lease
    Leadership {
        #[command(subcommand)]
        cmd: LeadershipCmd,
    },
    /// List the nodes' heartbeats (stale ones marked)
    Nodes,
    /// Adopt a project that the old hook-based tool left in the bucket
    /// (sqlite/claude-mem.db + .sha256 + manifest.json, and its lease)
    Migrate {
        /// The directory that will be mounted (default ~/.claude-mem)
        dir: Option<PathBuf>,
        /// Print each step and change nothing, in the bucket or locally
        #[arg(long)]
        dry_run: bool,
        /// Take the bucket's copy even if the local database differs (it is backed up first)
        #[arg(long)]
        replace_local: bool,
        /// Go back to the old tool: publish the head as its sqlite/ copy,
        /// unmount DIR, write a lease it accepts naming --to, and print
        /// the old tool's settings for every machine
        #[arg(long, conflicts_with_all = ["dry_run", "replace_local"])]
        rollback: bool,
        /// With --rollback: the old tool's primary (default: this node)
        #[arg(long, requires = "rollback")]
        to: Option<String>,
    },
    /// Import the rows of another claude-mem database (a copy this node set
    /// aside, a divergent tail, another machine's history) that the
    /// replicated one lacks, by natural key (primary; exit 3 elsewhere)
    Merge {
        /// The claude-mem database to import (or a divergent report naming its copy)
        file: PathBuf,
        /// Count per table what would be imported, present or conflicting; write nothing
        #[arg(long)]
        dry_run: bool,
        /// Acknowledge a set-aside copy without importing it (on any node)
        #[arg(long, conflicts_with = "dry_run")]
        dismiss: bool,
    },
    /// Spawned by the daemon: aborts its FUSE connection once it is dead
    #[command(name = "__watchdog", hide = true)]
    Watchdog {
        pid: i32,
        minor: u32,
        unique: Option<u64>,
    },
}

#[derive(Subcommand)]
enum LeadershipCmd {
    /// This node's role, the primary, epoch, policy and TTL remaining
    Info,
    /// Make NODE the primary: at once if nobody holds the lease, else the
    /// primary is asked to flush and hand over; returns once NODE takes writes
    Select {
        node: String,
        /// Replace a lease held by an old-tool node (which cannot hand over)
        /// at once, by compare-and-swap on its ETag; audited
        #[arg(long)]
        force: bool,
    },
    /// Policy follow: make this node the primary if the primary has been idle
    /// (no write for MEMBRIDGE_FOLLOW_IDLE_S); a busy primary keeps the lease
    /// (exit 3). Run by the Claude SessionStart hook and the `claude` wrapper
    Follow {
        /// Give up after this many seconds (the request is withdrawn)
        #[arg(long, default_value_t = 5)]
        wait: u64,
        /// As the hook runs it: everything on stderr, nothing when the policy
        /// is not follow or this node is primary already
        #[arg(long)]
        hook: bool,
    },
    /// Step down: release this node's lease so another node can take it at once
    Release,
}

fn default_dir() -> PathBuf {
    config::home_dir()
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".claude-mem")
}

fn flags(cli: &Cli) -> Result<BTreeMap<String, String>, String> {
    let mut m = BTreeMap::new();
    for kv in &cli.set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("-o {kv:?}: expected KEY=VALUE"))?;
        if !config::KEYS.iter().any(|(name, _, _)| *name == k) {
            return Err(format!("-o {kv:?}: unknown config key {k}"));
        }
        m.insert(k.to_string(), v.to_string());
    }
    let named = [
        (
            "MEMBRIDGE_CONFIG",
            cli.config.as_ref().map(|p| p.display().to_string()),
        ),
        ("MINIO_ENDPOINT", cli.endpoint.clone()),
        ("MINIO_BUCKET", cli.bucket.clone()),
        ("CLAUDE_PROJECT_ID", cli.project.clone()),
        ("MEMBRIDGE_NODE_ID", cli.node_id.clone()),
        ("MEMBRIDGE_METRICS_ADDR", cli.metrics_addr.clone()),
        (
            "MEMBRIDGE_STATE_DIR",
            cli.state_dir.as_ref().map(|p| p.display().to_string()),
        ),
    ];
    for (k, v) in named {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    }
    Ok(m)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,fuser=error,aws_config=warn,aws_smithy_runtime=warn,aws_sdk_s3=warn",
        )
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(cli: &Cli) -> Result<Config, String> {
    let layers = Layers::load(flags(cli)?);
    Config::from_layers(&layers).map_err(|e| e.to_string())
}

fn run(cli: Cli) -> Result<(), String> {
    match &cli.cmd {
        Cmd::Mount {
            dir,
            foreground,
            threads,
            passthrough,
            durability,
        } => {
            let cfg = load(&cli)?;
            init_logging(cli.log_format);
            let args = daemon::MountArgs {
                dir: dir.clone().unwrap_or_else(default_dir),
                foreground: *foreground,
                threads: *threads,
                passthrough: passthrough != "off",
                durability: match durability.as_str() {
                    "bucket" => return Err(BUCKET_DURABILITY.into()),
                    _ => Durability::Local,
                },
            };
            daemon::mount(&cfg, &args).map_err(|e| format!("{e:#}"))
        }
        Cmd::Unmount { dir, lazy } => {
            let dir = dir.clone().unwrap_or_else(default_dir);
            daemon::unmount(&dir, *lazy).map_err(|e| format!("{e:#}"))
        }
        Cmd::Status { dir, json } => {
            let dir = dir.clone().unwrap_or_else(default_dir);
            let doc = daemon::read_status(&dir).map_err(|e| {
                format!(
                    "{}: not mounted or not a membridge mount ({e:#})",
                    dir.display()
                )
            })?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            } else {
                print!("{}", membridge::report::render_text(&doc));
            }
            Ok(())
        }
        Cmd::Push => {
            let cfg = load(&cli)?;
            control(&cfg, "push")
        }
        Cmd::Pull => {
            let cfg = load(&cli)?;
            control(&cfg, "pull")
        }
        Cmd::Restore {
            db,
            to,
            txid,
            time,
            force,
        } => {
            let cfg = load(&cli)?;
            restore(&cfg, db, to, *txid, time.as_deref(), *force)
        }
        Cmd::Doctor { dir, create_bucket } => {
            let cfg = load(&cli)?;
            doctor(
                &cfg,
                dir.clone().unwrap_or_else(default_dir),
                *create_bucket,
            )
        }
        Cmd::Watchdog { pid, minor, unique } => {
            let id = daemon::watchdog::MountId {
                minor: *minor,
                unique: *unique,
            };
            daemon::watchdog::run(*pid, id);
            Ok(())
        }
        Cmd::Leadership { cmd } => leadership(&load(&cli)?, cmd),
        Cmd::Nodes => nodes(&load(&cli)?),
        Cmd::Merge {
            file,
            dry_run,
            dismiss,
        } => {
            let cfg = load(&cli)?;
            if *dismiss {
                return dismiss_copy(&cfg, file);
            }
            init_logging(cli.log_format);
            merge(&cfg, file, *dry_run)
        }
        Cmd::Migrate {
            dir,
            rollback: true,
            to,
            ..
        } => {
            let cfg = load(&cli)?;
            let dir = dir.clone().unwrap_or_else(default_dir);
            let dir = dir.canonicalize().unwrap_or(dir);
            let to = to.clone().unwrap_or_else(|| cfg.node_id.clone());
            migrate_rollback(&cfg, &dir, &to)
        }
        Cmd::Migrate {
            dir,
            dry_run,
            replace_local,
            ..
        } => {
            let cfg = load(&cli)?;
            let opts = membridge::migrate::Options {
                dir: dir.clone().unwrap_or_else(default_dir),
                dry_run: *dry_run,
                replace_local: *replace_local,
                progress: true,
            };
            migrate(&cfg, &opts)
        }
    }
}

fn lease_client(cfg: &Config) -> membridge::lease::LeaseClient {
    let store =
        membridge::remote::S3Store::new(&cfg.s3, membridge::remote::S3Options::interactive());
    membridge::lease::LeaseClient::new(&cfg.lease(), std::sync::Arc::new(store))
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    Ok(rt.block_on(f))
}

/// `leadership release` on a node that is not the primary exits 3 (refused on a
/// secondary), with the reason on one line.
fn leadership(cfg: &Config, cmd: &LeadershipCmd) -> Result<(), String> {
    let c = lease_client(cfg);
    match cmd {
        LeadershipCmd::Info => {
            let (lease, handover) = block_on(async { (c.read().await, c.read_handover().await) })?;
            let lease = lease.map_err(|e| e.to_string())?.map(|v| v.lease);
            let handover = handover.ok().flatten();
            let now = chrono::Utc::now();
            print!(
                "{}",
                membridge::cli::lease::render_info(&c, lease.as_ref(), handover.as_ref(), now)
            );
            Ok(())
        }
        LeadershipCmd::Select { node, force } => {
            let mut say = |line: &str| println!("membridge: {line}");
            if *node == cfg.node_id {
                // This node's daemon takes the lease up the moment it comes.
                let _ = daemon::request(cfg, "expect-lease");
            }
            block_on(async {
                let v = if *force {
                    match c.select_force(node).await? {
                        membridge::lease::Select::Changed(v) => {
                            say(&format!(
                                "{node} is primary now (epoch {}); the lease it replaced is in the audit log",
                                v.lease.epoch
                            ));
                            v
                        }
                        membridge::lease::Select::Unchanged(v) => {
                            say(&format!("{node} is primary already (epoch {})", v.lease.epoch));
                            v
                        }
                        // select_force refuses rather than ask for a hand-over.
                        membridge::lease::Select::NeedsHandover(v) => v,
                    }
                } else {
                    c.request_handover(node, c.select_wait(), &mut say).await?
                };
                if let Some(why) = c.no_fresh_heartbeat(node).await {
                    say(&format!(
                        "{node} takes writes once its daemon runs and has caught up ({why})"
                    ));
                    return Ok(());
                }
                c.wait_taken_over(node, v.lease.epoch, c.select_wait(), &mut say)
                    .await
                    .map(|_| ())
            })?
            .map_err(|e| e.to_string())?;
            Ok(())
        }
        LeadershipCmd::Follow { wait, hook } => follow(cfg, &c, *wait, *hook),
        LeadershipCmd::Release => {
            let released = block_on(c.release_own())?.map_err(|e| e.to_string())?;
            match released.outcome(&cfg.node_id) {
                Ok(line) => {
                    println!("membridge: {line}");
                    Ok(())
                }
                Err(refusal) => {
                    eprintln!("membridge: {refusal}");
                    std::process::exit(3)
                }
            }
        }
    }
}

/// `leadership follow`: exit 0 when this node is primary (or the policy is
/// not follow), 3 when a busy primary keeps the lease, 1 on an error. The
/// hook's lines go to stderr: a SessionStart hook's stdout would go into the
/// conversation.
fn follow(
    cfg: &Config,
    c: &membridge::lease::LeaseClient,
    wait: u64,
    hook: bool,
) -> Result<(), String> {
    use membridge::lease::Follow;
    let say = |line: &str| {
        if hook {
            eprintln!("membridge: {line}");
        } else {
            println!("membridge: {line}");
        }
    };
    let config::Policy::Follow { idle_s } = cfg.policy else {
        if !hook {
            say(&format!(
                "the policy here is {}, not follow (LEADERSHIP_POLICY=follow): nothing to do",
                cfg.policy.name()
            ));
        }
        return Ok(());
    };
    // A lease handed to a node without a running daemon would leave the
    // project without a writer until it expires.
    if let Err(e) = daemon::request(cfg, "expect-lease") {
        return Err(format!(
            "follow: cannot reach this node's daemon, which must be mounted (and as new as this command) to take the lease: {e:#}"
        ));
    }
    let start = std::time::Instant::now();
    let limit = std::time::Duration::from_secs(wait.max(1));
    let idle = std::time::Duration::from_secs(idle_s);
    let mut quiet = |_: &str| {};
    let outcome = block_on(async {
        let got = c.request_follow(idle, limit, &mut quiet).await?;
        if let Follow::Moved(v) = &got {
            let left = limit.saturating_sub(start.elapsed());
            c.wait_taken_over(&cfg.node_id, v.lease.epoch, left, &mut quiet)
                .await?;
        }
        Ok::<_, membridge::lease::LeaseError>(got)
    })?
    .map_err(|e| format!("follow: {e}"))?;
    match outcome {
        Follow::Already(_) if hook => Ok(()),
        Follow::Already(v) => {
            say(&format!(
                "this node ({}) is primary already (epoch {})",
                cfg.node_id, v.lease.epoch
            ));
            Ok(())
        }
        Follow::Moved(v) => {
            say(&format!(
                "the lease followed you: this node ({}) is primary now (epoch {}, {:.1} s)",
                cfg.node_id,
                v.lease.epoch,
                start.elapsed().as_secs_f64()
            ));
            Ok(())
        }
        Follow::Busy { primary, reason } => {
            // One line, on stderr, whatever the mode.
            eprintln!(
                "membridge: {primary} stays primary, it is in use: {reason}. This node ({}) reads its memory; claude-mem's writes here are refused until it is primary",
                cfg.node_id
            );
            std::process::exit(3)
        }
    }
}

fn nodes(cfg: &Config) -> Result<(), String> {
    let layout = cfg.layout();
    let c = lease_client(cfg);
    let now = chrono::Utc::now();
    let interval = membridge::lease::DEFAULT_HEARTBEAT_INTERVAL;
    let entries = block_on(membridge::lease::list_nodes(
        &*c.store, &layout, interval, now,
    ))?
    .map_err(|e| e.to_string())?;
    print!("{}", membridge::cli::lease::render_nodes(&entries, now));
    Ok(())
}

fn doctor(cfg: &Config, dir: PathBuf, create_bucket: bool) -> Result<(), String> {
    let rt = runtime()?;
    if create_bucket {
        let store =
            membridge::remote::S3Store::new(&cfg.s3, membridge::remote::S3Options::interactive());
        rt.block_on(store.create_bucket())
            .map_err(|e| format!("creating bucket {}: {e}", cfg.s3.bucket))?;
        println!("[ok]   bucket {} exists", cfg.s3.bucket);
    }
    let local = membridge::doctor::Local {
        dir,
        home: config::home_dir(),
    };
    let report = rt.block_on(membridge::doctor::run_full(
        cfg,
        &local,
        &mut std::io::stdout(),
    ));
    match report.exit_code() {
        0 => Ok(()),
        code => std::process::exit(code),
    }
}

fn migrate(cfg: &Config, opts: &membridge::migrate::Options) -> Result<(), String> {
    let store =
        membridge::remote::S3Store::new(&cfg.s3, membridge::remote::S3Options::interactive());
    runtime()?
        .block_on(membridge::migrate::run(
            cfg,
            &store,
            opts,
            &mut std::io::stdout(),
        ))
        .map(|_| ())
        .map_err(|e| format!("migrate: {e}"))
}

/// `membridge migrate --rollback [--to NODE] [DIR]` (docs/MIGRATION.md,
/// "Rollback"): publish and unmount here if mounted, then the bucket's part
/// ([`membridge::coexist::rollback_bucket`]), then each machine's settings.
fn migrate_rollback(cfg: &Config, dir: &std::path::Path, to: &str) -> Result<(), String> {
    use membridge::fs::mount::{state, MountState};
    let say = |line: &str| println!("migrate: {line}");
    let mut local_is_head = false;
    match state(dir) {
        MountState::Live => {
            let doc = daemon::read_status(dir).map_err(|e| format!("{e:#}"))?;
            if doc.role == "primary" {
                let msg = daemon::request(cfg, "push")
                    .map_err(|e| format!("publishing before the rollback: {e:#}"))?;
                say(&format!("published: {msg}"));
                local_is_head = to == cfg.node_id;
            }
            daemon::unmount(dir, false)
                .map_err(|e| format!("unmounting {}: {e:#}", dir.display()))?;
            say(&format!("unmounted {}", dir.display()));
        }
        MountState::Stale => {
            return Err(format!(
                "{} is a stale mount: membridge unmount {} first",
                dir.display(),
                dir.display()
            ))
        }
        MountState::NotMounted | MountState::Foreign => say(&format!(
            "{} is not mounted by membridge here",
            dir.display()
        )),
    }
    let store: std::sync::Arc<dyn membridge::remote::ObjectStore> = std::sync::Arc::new(
        membridge::remote::S3Store::new(&cfg.s3, membridge::remote::S3Options::interactive()),
    );
    let r = runtime()?
        .block_on(membridge::coexist::rollback_bucket(
            &cfg.lease(),
            &cfg.project_id,
            &cfg.state_dir,
            store,
            to,
        ))
        .map_err(|e| format!("rollback: {e}"))?;
    say(&format!(
        "the old tool's copy sqlite/claude-mem.db is membridge's head (txid {}, sha256 {}…)",
        r.txid,
        &r.sha256[..12]
    ));
    say(&format!(
        "lease: {} for the old tool ({} s, epoch {}); the old tool renews it on {to} once PRIMARY_NODE_ID={to} is set there",
        to, r.lease.lease_seconds, r.lease.epoch
    ));
    say("now, machine by machine:");
    for line in membridge::coexist::rollback_settings(to, &r.others, local_is_head).lines() {
        say(&format!("  {line}"));
    }
    say("membridge's own objects (manifest.json, db/, nodes/) stay; the old tool ignores them");
    Ok(())
}

/// `membridge merge --dismiss FILE`: a set-aside copy is acknowledged and
/// no longer makes this node DEGRADED; the file itself stays.
fn dismiss_copy(cfg: &Config, file: &std::path::Path) -> Result<(), String> {
    use membridge::replica::aside;
    let e = aside::locate(file).ok_or_else(|| {
        format!(
            "{}: not a set-aside copy (those are listed by `membridge status` and `doctor`, \
             under replaced/ or divergent/ in the state dir)",
            file.display()
        )
    })?;
    if let Some(r) = &e.resolution {
        println!(
            "membridge: {} was already {} ({})",
            e.key().display(),
            r.how,
            r.at
        );
        return Ok(());
    }
    aside::resolve(
        &e,
        "dismissed",
        format!("membridge merge --dismiss on node {}", cfg.node_id),
    )
    .map_err(|err| format!("marking {}: {err}", e.key().display()))?;
    println!(
        "membridge: dismissed {}: its rows stay out of claude-mem; the file stays (delete it when you like)",
        e.key().display()
    );
    Ok(())
}

/// `membridge merge FILE [--dry-run]`: on the primary only, through its
/// mount (the daemon says which role it has and where it is mounted), so
/// that the imported rows replicate like any write.
fn merge(cfg: &Config, file: &std::path::Path, dry_run: bool) -> Result<(), String> {
    use membridge::merge::{self, MergeError};
    use membridge::replica::aside;
    let entry = aside::locate(file);
    // A divergent report names its copy.
    let file = entry
        .as_ref()
        .and_then(|e| e.copy.clone())
        .unwrap_or_else(|| file.to_path_buf());
    let role = || -> Result<(String, PathBuf), String> {
        let reply = daemon::request(cfg, "role").map_err(|e| format!("{e:#}"))?;
        let (role, dir) = reply.split_once(' ').unwrap_or((&reply, ""));
        Ok((role.to_string(), PathBuf::from(dir)))
    };
    let (now, dir) = role().map_err(|e| format!("merge: {e}"))?;
    if now != "primary" {
        eprintln!(
            "membridge: merge refused: this node is {now}; merge writes through the primary's mount \
             so that the rows replicate: run it on the primary (copy {} there first)",
            file.display()
        );
        std::process::exit(3);
    }
    let target = dir.join(merge::DB);
    if file.canonicalize().ok() == target.canonicalize().ok() {
        return Err(format!(
            "merge: {} is the replicated database itself",
            file.display()
        ));
    }
    let opts = merge::Options {
        dry_run,
        progress: true,
        ..merge::Options::default()
    };
    let mut still_primary = || match role()? {
        (r, _) if r == "primary" => Ok(()),
        (r, _) => Err(format!("this node is no longer the primary (now {r})")),
    };
    let report = match merge::merge(&file, &target, &opts, &mut still_primary) {
        Ok(r) => r,
        Err(MergeError::Stopped { why, imported }) => {
            eprintln!("membridge: merge stopped: {why}; {imported} rows were imported before: run it again on the primary");
            std::process::exit(3);
        }
        Err(e) => return Err(format!("merge: {e}")),
    };
    print!("{}", report.render());
    let first = entry
        .as_ref()
        .filter(|e| e.resolution.as_ref().is_none_or(|r| r.how != "merged"));
    if let (false, Some(e)) = (dry_run, first) {
        let detail = format!(
            "{} rows imported into {} on node {}",
            report.new_rows(),
            target.display(),
            cfg.node_id
        );
        match aside::resolve(e, "merged", detail) {
            Ok(()) => println!("membridge: {} is marked merged", e.key().display()),
            Err(err) => eprintln!(
                "membridge: could not mark {} merged: {err}",
                e.key().display()
            ),
        }
    }
    Ok(())
}

/// A request to the running daemon; a refusal exits with the old tool's code.
fn control(cfg: &Config, what: &str) -> Result<(), String> {
    match daemon::request(cfg, what) {
        Ok(msg) => {
            println!("membridge: {msg}");
            Ok(())
        }
        Err(e) => match e.downcast_ref::<daemon::Refused>() {
            Some(r) => {
                eprintln!("membridge: {what} refused: {}", r.message);
                std::process::exit(r.code as i32)
            }
            None => Err(format!("{what}: {e:#}")),
        },
    }
}

fn restore(
    cfg: &Config,
    db: &str,
    to: &std::path::Path,
    txid: Option<u64>,
    time: Option<&str>,
    force: bool,
) -> Result<(), String> {
    use membridge::replica::restore::{self, RestoreOptions, Target};
    let target = match (txid, time) {
        (Some(t), _) => Target::Txid(t),
        (None, Some(s)) => Target::Time(
            chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|e| {
                    format!("--time {s:?}: not an RFC 3339 time (e.g. 2026-03-01T12:00:00Z): {e}")
                })?
                .with_timezone(&chrono::Utc),
        ),
        (None, None) => Target::Latest,
    };
    let rt = runtime()?;
    let store =
        membridge::remote::S3Store::new(&cfg.s3, membridge::remote::S3Options::interactive());
    let layout = cfg.layout();
    let opts = RestoreOptions {
        progress: true,
        force,
    };
    let r = rt
        .block_on(restore::restore_with(
            &store,
            &layout,
            &cfg.canonical_id,
            db,
            target,
            to,
            opts,
        ))
        .map_err(|e| format!("restore: {e}"))?;
    let when = r
        .commit_time()
        .map(|t| format!(", committed {}", t.to_rfc3339()))
        .unwrap_or_default();
    println!(
        "restored {db} at txid {}{when} to {} ({} pages of {} bytes, checksum {:016x}; snapshot {} + {} segment(s), {} bytes downloaded)",
        r.txid,
        to.display(),
        r.size_pages,
        r.page_size,
        r.checksum,
        r.snapshot_key,
        r.segments_applied,
        r.bytes_downloaded
    );
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("membridge: {msg}");
            ExitCode::from(1)
        }
    }
}
