//! Running cases: the random run (`lifecycle_model`), its seed and trace,
//! and the fixed regressions the model found.

use super::*;

/// Runs one case from scratch; the error carries what each step did.
fn run_case(
    rt: &tokio::runtime::Runtime,
    c: &Case,
    stats: &RefCell<BTreeMap<&'static str, u64>>,
) -> Result<(), String> {
    let mut w = World::new(rt, c.nodes as usize);
    w.tailing = c.tailing;
    let res = (|| {
        w.seed();
        w.note(if c.tailing {
            "-- start: n0 has the database; primaries' databases are served by the kernel --"
        } else {
            "-- start: n0 has the database --"
        });
        for i in 0..w.nodes.len() {
            w.start(i)?;
        }
        w.sync_tails()?;
        w.check()?;
        for s in &c.steps {
            w.step(*s)?;
            w.drop_stale_clients();
            w.sync_tails()?;
            w.check()?;
        }
        w.settle_all()
    })();
    for i in 0..w.nodes.len() {
        w.kill(i);
    }
    for (k, v) in &w.stats {
        *stats.borrow_mut().entry(k).or_default() += v;
    }
    if std::env::var_os("MEMBRIDGE_MODEL_TRACE").is_some() {
        eprintln!("{}\n", w.trace.join("\n"));
    }
    res.map_err(|e| format!("{e}\n--- what each step did ---\n{}", w.trace.join("\n")))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Runs `cases` random cases (seeded by `MEMBRIDGE_MODEL_SEED` if set);
/// panics with the seed, the shrunk sequence and its trace on a failure.
fn run_model(cases: u32, max_steps: usize) {
    let seed = std::env::var("MEMBRIDGE_MODEL_SEED")
        .ok()
        .and_then(|s| hex::decode(s.trim()).ok())
        .filter(|b| b.len() == 32)
        .unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec());
    let config = PtConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..PtConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let stats = RefCell::new(BTreeMap::new());
    let res = runner.run(&case(max_steps), |c| {
        run_case(&rt, &c, &stats).map_err(TestCaseError::fail)
    });
    eprintln!(
        "model: {cases} cases in {:.1} s (seed {})",
        started.elapsed().as_secs_f64(),
        hex::encode(&seed)
    );
    for (k, v) in stats.borrow().iter() {
        eprintln!("model: {v:>8} {k}");
    }
    match res {
        Ok(()) => {}
        Err(TestError::Fail(why, c)) => panic!(
            "model-based test failed; replay with MEMBRIDGE_MODEL_SEED={}\n\
             shrunk sequence ({} nodes):\n{:#?}\n{why}",
            hex::encode(&seed),
            c.nodes,
            c.steps
        ),
        Err(e) => panic!("seed {}: {e}", hex::encode(&seed)),
    }
}

#[test]
fn lifecycle_model() {
    let cases = env_u64("MEMBRIDGE_MODEL_CASES").unwrap_or(2000) as u32;
    let steps = env_u64("MEMBRIDGE_MODEL_STEPS").unwrap_or(12) as usize;
    run_model(cases, steps);
}

/// Runs one fixed sequence (a regression found by the model).
fn replay(nodes: u8, steps: &[Step]) {
    replay_with(nodes, steps, false)
}

/// As [`replay`], the primaries' databases served by the kernel.
fn replay_tailing(nodes: u8, steps: &[Step]) {
    replay_with(nodes, steps, true)
}

fn replay_with(nodes: u8, steps: &[Step], tailing: bool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = Case {
        nodes,
        steps: steps.to_vec(),
        tailing,
    };
    if let Err(e) = run_case(&rt, &c, &RefCell::default()) {
        panic!("{:#?}\n{e}", c.steps);
    }
}

/// The primary commits before its first upload and dies; another node
/// takes the lease (the bucket has no history of the database yet). At its
/// restart the dead node's transactions were neither publishable (another
/// node is primary) nor set aside: a backlog nobody uploads, nobody is told
/// about. `divergent::judge` now sets them aside.
#[test]
fn model_unknown_database_after_a_takeover() {
    replay(
        2,
        &[
            Step::Commit { node: 0, rows: 1 },
            Step::Expire,
            Step::Tick { node: 1 },
            Step::Kill { node: 0 },
        ],
    );
    replay(
        2,
        &[
            Step::Expire,
            Step::Tick { node: 1 },
            Step::CrashMidCommit { node: 0, rows: 1 },
        ],
    );
}

/// The manifest's compare-and-swap is applied but its answer lost, then the
/// node restarts: it is promoted again (the bucket's head is its own), but
/// its journal never learnt that the transaction was published, so the
/// backlog never drained (and a later fencing would have reported it as
/// divergent). The uploader now marks the bucket's head as uploaded when it
/// is the node's own.
#[test]
fn model_lost_manifest_answer_then_restart() {
    replay(
        2,
        &[
            Step::Upload { node: 0 },
            Step::Fault {
                node: 0,
                fault: FaultKind::Lost(Obj::Manifest),
            },
            Step::Commit { node: 0, rows: 1 },
            Step::Upload { node: 0 },
            Step::Kill { node: 0 },
        ],
    );
}

/// Issue 11, item 4, as the model finds it: n0 is deposed with unpublished
/// transactions (set aside), follows n1's head, restarts: its file and
/// journal disagree, so it starts generation 2 at txid 4, a number past the
/// bucket's head. n1 publishes txid 3; then n0 gets the lease back and was
/// promoted without catching up ("newer": 4 > 3), its snapshot replacing
/// the bucket's history, and n1's acknowledged txid 3 was gone from it (and
/// from any report). A new local generation now continues the bucket only
/// on top of exactly the head it replaced.
#[test]
fn model_stale_new_generation_does_not_replace_a_newer_history() {
    use Step::*;
    replay(
        2,
        &[
            Commit { node: 0, rows: 1 },
            Upload { node: 0 },
            Commit { node: 0, rows: 1 },
            Commit { node: 0, rows: 1 },
            Expire,
            Tick { node: 1 },
            Follow { node: 1 },
            Tick { node: 1 },
            Tick { node: 0 },
            Commit { node: 1, rows: 1 },
            Upload { node: 1 },
            Follow { node: 0 },
            Kill { node: 0 },
            Start { node: 0 },
            Commit { node: 1, rows: 1 },
            Upload { node: 1 },
            Expire,
            Tick { node: 0 },
            Upload { node: 0 },
        ],
    );
}

/// Issue 11, item 2 (its second half), as the model finds it: the
/// manifest's compare-and-swap is applied but its answer lost, the node
/// commits again and restarts. The bucket's head is its own txid, but its
/// journal says nothing was uploaded, so take_over found neither "same
/// head" nor "uploaded == head" and the node stayed catching-up for ever.
#[test]
fn model_lost_manifest_answer_then_more_commits_and_a_restart() {
    let lost = Step::Fault {
        node: 0,
        fault: FaultKind::Lost(Obj::Manifest),
    };
    replay(
        2,
        &[
            Step::Upload { node: 0 },
            lost,
            Step::Commit { node: 0, rows: 1 },
            Step::Upload { node: 0 },
            Step::CrashMidCommit { node: 0, rows: 1 },
        ],
    );
    replay(
        2,
        &[
            lost,
            Step::Commit { node: 0, rows: 1 },
            Step::Upload { node: 0 },
            Step::Commit { node: 0, rows: 1 },
            Step::Kill { node: 0 },
        ],
    );
}

/// A follower lays out the head, is killed and restarts: its file already
/// is the head, so the stand-in returned without publishing the applied
/// txid, and take_over kept it catching-up for ever ("applied txid 0 of the
/// bucket's 1"). The real follower publishes the head once its file hashes
/// to it; the stand-in now does the same.
#[test]
fn model_restarted_follower_at_the_head_can_take_over() {
    replay(
        2,
        &[
            Step::Commit { node: 0, rows: 1 },
            Step::Upload { node: 0 },
            Step::Follow { node: 1 },
            Step::Expire,
            Step::Kill { node: 1 },
        ],
    );
}

/// A deposed primary uploads after another node took over: its segment for
/// txid 1 is stored (create-only) before its manifest compare-and-swap
/// fails. The new primary's own txid 1 then found the key taken by "another
/// primary" and could never publish. The new primary now replaces a
/// deposed epoch's segment for txids the manifest gives to its own epoch.
#[test]
fn model_deposed_primarys_segment_does_not_block_the_new_primary() {
    replay(
        3,
        &[
            Step::Expire,
            Step::Upload { node: 0 },
            Step::Commit { node: 0, rows: 1 },
            Step::Follow { node: 1 },
            Step::Tick { node: 1 },
            Step::Upload { node: 0 },
            Step::Commit { node: 0, rows: 1 },
        ],
    );
}

/// A primary whose lease expired takes it again at once and commits on a
/// database the kernel serves: the commit must still be tailed and published.
#[test]
fn model_a_commit_after_taking_the_lease_back_is_tailed() {
    replay_tailing(
        2,
        &[
            Step::Expire,
            Step::Tick { node: 0 },
            Step::Tick { node: 2 },
            Step::Commit { node: 0, rows: 1 },
        ],
    );
}
