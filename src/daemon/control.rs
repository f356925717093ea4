//! The control socket: `membridge push`, `pull`, `expect-lease` and `role`
//! sent to a running daemon, the reply line's words, and the exit codes the
//! CLI makes of them.

use super::*;

pub fn control_socket(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("control.sock")
}

/// The daemon's control socket: one request line, one reply line.
pub(super) fn serve_control(
    path: PathBuf,
    commands: tokio::sync::mpsc::Sender<UploaderCommand>,
    node: Arc<Node>,
    keeper: Arc<LeaseKeeper>,
    status: Status,
    poll: Duration,
) -> Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut line = String::new();
                let mut reader = std::io::BufReader::new(&conn);
                if std::io::BufRead::read_line(&mut reader, &mut line).is_err() {
                    continue;
                }
                let shutting_down = || ControlError::Failed("daemon is shutting down".into());
                let reply = match line.trim() {
                    "push" => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        match commands.blocking_send(UploaderCommand::Push(tx)) {
                            Ok(()) => match rx.blocking_recv() {
                                Ok(r) => r.map_err(ControlError::from_push),
                                Err(_) => Err(shutting_down()),
                            },
                            Err(_) => Err(shutting_down()),
                        }
                    }
                    "pull" => pull(&node, poll),
                    // `leadership select` / `follow` naming this node, run
                    // here: take the lease up the moment it is handed over.
                    "expect-lease" => {
                        keeper.expect_lease(keeper.client().select_wait());
                        Ok("watching the lease".into())
                    }
                    // `membridge merge` writes through the mount, on the primary only.
                    "role" => Ok(format!(
                        "{} {}",
                        node.role().name(),
                        status.snapshot().mount_dir
                    )),
                    other => Err(ControlError::Failed(format!("unknown request {other:?}"))),
                };
                let line = match reply {
                    Ok(m) => format!("ok {m}\n"),
                    Err(e) => format!("{}\n", e.wire()),
                };
                let _ = (&conn).write_all(line.as_bytes());
            }
        })?;
    Ok(())
}

/// Why the daemon did not do what a control request asked. On the socket it
/// is the first word of the reply line (see [`ControlError::wire`]), which
/// [`request`] turns back into an exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ControlError {
    /// Declined because of this node's role: it is the primary (`push` is
    /// the only way to publish there, `pull` has nothing to do), or it is a
    /// secondary (`push`).
    Refused { on_primary: bool, message: String },
    /// The request was valid for this role but did not succeed.
    Failed(String),
}

impl ControlError {
    /// The reply line's words: `refused-primary`, `refused` or `error`, then
    /// the message.
    pub(super) fn wire(&self) -> String {
        match self {
            ControlError::Refused {
                on_primary: true,
                message,
            } => format!("refused-primary {message}"),
            ControlError::Refused {
                on_primary: false,
                message,
            } => format!("refused {message}"),
            ControlError::Failed(m) => format!("error {m}"),
        }
    }

    /// The uploader's `push` failure: refused when this node is not the
    /// primary, failed otherwise.
    pub(super) fn from_push(e: UploadError) -> Self {
        match e {
            UploadError::Refused(why) => ControlError::Refused {
                on_primary: false,
                message: why,
            },
            e => ControlError::Failed(e.to_string()),
        }
    }
}

/// `membridge pull`: a secondary waits until its follower has applied the
/// bucket's head (it polls on its own; this just waits for it, bounded).
/// It decides from the follower's own progress (`Node::views`), not from
/// `status.json`.
pub(super) fn pull(node: &Node, poll: Duration) -> std::result::Result<String, ControlError> {
    if matches!(node.role(), Role::Primary | Role::HandingOver) {
        return Err(ControlError::Refused {
            on_primary: true,
            message: "this node is the primary: it is the source, there is nothing to pull".into(),
        });
    }
    // Let the follower read the newest manifest first.
    std::thread::sleep(poll + Duration::from_millis(200));
    let start = Instant::now();
    loop {
        let views = node.views().all();
        let behind: Vec<String> = views
            .iter()
            .filter(|(_, d)| d.applied_txid < d.head_txid)
            .map(|(n, d)| format!("{n} at {} of {}", d.applied_txid, d.head_txid))
            .collect();
        if behind.is_empty() {
            let at: Vec<String> = views
                .iter()
                .map(|(n, d)| format!("{n} at txid {}", d.applied_txid))
                .collect();
            return Ok(if at.is_empty() {
                "nothing published yet".into()
            } else {
                format!("caught up: {}", at.join(", "))
            });
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(ControlError::Failed(format!(
                "not caught up after 30 s: {}",
                behind.join(", ")
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The daemon declined a request because of this node's role; the exit code
/// is the old tool's (2: refused on the primary, 3: refused on a secondary).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub code: u8,
    pub message: String,
}

/// Send one request to the running daemon of this project.
pub fn request(cfg: &Config, what: &str) -> Result<String> {
    let path = control_socket(cfg);
    let mut conn = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        anyhow!(
            "no membridge daemon for project {} is running here ({}: {e}); mount first",
            cfg.canonical_id,
            path.display()
        )
    })?;
    writeln!(conn, "{what}")?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    parse_reply(reply.trim())
}

/// A reply line as the CLI reports it: the message, or an error ([`Refused`]
/// with the old tool's exit code when the node's role declined).
pub(super) fn parse_reply(reply: &str) -> Result<String> {
    match reply.split_once(' ') {
        Some(("ok", m)) => Ok(m.to_string()),
        Some(("error", m)) => bail!("{m}"),
        Some(("refused", m)) => Err(Refused {
            code: 3,
            message: m.to_string(),
        }
        .into()),
        Some(("refused-primary", m)) => Err(Refused {
            code: 2,
            message: m.to_string(),
        }
        .into()),
        _ => bail!("unexpected reply from the daemon: {reply:?}"),
    }
}
