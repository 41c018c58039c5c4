use super::*;

use crate::config::Config;

fn metrics() -> Arc<Metrics> {
    let config = Config::from_yaml(
        r#"
listen: [{addr: "127.0.0.1:1"}]
actions:
  - name: a
    path: /a
    upstreams: [{name: up1, url: "http://127.0.0.1:1/"}, {name: up2, url: "http://127.0.0.1:1/"}]
"#,
        &|_| None,
    )
    .unwrap();
    Arc::new(Metrics::new(&config))
}

fn open(dir: &Path) -> (Spool, Arc<Metrics>) {
    let m = metrics();
    (
        Spool::open(dir, Duration::from_secs(3600), m.clone()).unwrap(),
        m,
    )
}

fn event(id: &str) -> NewEvent {
    NewEvent {
        action: Arc::from("a"),
        event_id: id.to_string(),
        body: Bytes::from(format!("{{\"event_id\":\"{id}\"}}")),
        upstreams: vec![Arc::from("up1"), Arc::from("up2")],
    }
}

fn none() -> HashSet<u64> {
    HashSet::new()
}

#[tokio::test]
async fn accepted_events_get_one_due_delivery_per_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, metrics) = open(dir.path());
    assert!(matches!(
        spool.append(event("e1")).await.unwrap(),
        Appended::Accepted(_)
    ));
    let up1 = spool.due("a/up1", now_ms(), 10, &none()).unwrap();
    let up2 = spool.due("a/up2", now_ms(), 10, &none()).unwrap();
    assert_eq!((up1.len(), up2.len()), (1, 1));
    let (record, body) = spool.load(up1[0]).unwrap().unwrap();
    assert_eq!(record.event_id, "e1");
    assert_eq!(record.upstream, "up1");
    assert_eq!(&body[..], br#"{"event_id":"e1"}"#);
    assert_eq!(metrics.pending_deliveries("up1").get(), 1);
    assert_eq!(
        spool.counts().unwrap(),
        SpoolCounts {
            events: 1,
            pending: 2,
            dedup_keys: 1,
            dead: 0
        }
    );
}

#[tokio::test]
async fn duplicates_are_not_stored_and_dedup_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (spool, _) = open(dir.path());
        spool.append(event("e1")).await.unwrap();
        assert_eq!(
            spool.append(event("e1")).await.unwrap(),
            Appended::Duplicate
        );
        // The same event_id for another action is a different event.
        let mut other = event("e1");
        other.action = Arc::from("b");
        assert!(matches!(
            spool.append(other).await.unwrap(),
            Appended::Accepted(_)
        ));
    }
    let (spool, metrics) = open(dir.path());
    assert_eq!(
        spool.append(event("e1")).await.unwrap(),
        Appended::Duplicate
    );
    assert_eq!(spool.counts().unwrap().events, 2);
    // Gauges are rebuilt from the store on open.
    assert_eq!(metrics.pending_deliveries("up1").get(), 2);
}

#[tokio::test]
async fn dedup_keys_expire_after_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), Duration::from_millis(1), metrics()).unwrap();
    spool.append(event("e1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(matches!(
        spool.append(event("e1")).await.unwrap(),
        Appended::Accepted(_)
    ));
}

#[tokio::test]
async fn event_bytes_go_once_every_delivery_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, metrics) = open(dir.path());
    spool.append(event("e1")).await.unwrap();
    let up1 = spool.due("a/up1", now_ms(), 10, &none()).unwrap()[0];
    let up2 = spool.due("a/up2", now_ms(), 10, &none()).unwrap()[0];
    spool
        .finish(
            up1,
            Finish::Delivered {
                at_ms: now_ms(),
                status: 200,
            },
        )
        .await
        .unwrap();
    assert_eq!(spool.counts().unwrap().events, 1);
    spool.finish(up2, Finish::Skipped).await.unwrap();
    assert_eq!(
        spool.counts().unwrap(),
        SpoolCounts {
            events: 0,
            pending: 0,
            dedup_keys: 1,
            dead: 0
        }
    );
    assert_eq!(metrics.pending_deliveries("up1").get(), 0);
    assert_eq!(metrics.pending_deliveries("up2").get(), 0);
}

#[tokio::test]
async fn retries_move_the_delivery_later_in_its_lane() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = open(dir.path());
    spool.append(event("e1")).await.unwrap();
    let id = spool.due("a/up1", now_ms(), 10, &none()).unwrap()[0];
    let later = now_ms() + 60_000;
    let retry = Finish::Retry {
        at_ms: now_ms(),
        due_ms: later,
        error: "HTTP 503".into(),
        status: Some(503),
    };
    spool.finish(id, retry).await.unwrap();
    assert!(spool
        .due("a/up1", now_ms(), 10, &none())
        .unwrap()
        .is_empty());
    assert_eq!(spool.next_due_ms("a/up1", &none()).unwrap(), Some(later));
    assert_eq!(spool.due("a/up1", later, 10, &none()).unwrap(), vec![id]);
    let (record, _) = spool.load(id).unwrap().unwrap();
    assert_eq!(record.attempts, 1);
    assert_eq!(record.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(record.last_status, Some(503));
}

#[tokio::test]
async fn dead_letters_can_be_listed_replayed_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, metrics) = open(dir.path());
    spool.append(event("e1")).await.unwrap();
    let id = spool.due("a/up1", now_ms(), 10, &none()).unwrap()[0];
    let dead = Finish::Dead {
        at_ms: now_ms(),
        error: "HTTP 404".into(),
        status: Some(404),
        attempted: true,
    };
    spool.finish(id, dead.clone()).await.unwrap();
    assert_eq!(metrics.dead_letters("up1").get(), 1);
    assert_eq!(metrics.pending_deliveries("up1").get(), 0);
    let letters = spool.dead_letters(10).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts, 1);
    assert!(letters[0].dead_ms.is_some());

    assert_eq!(spool.replay(Some(id)).await.unwrap(), 1);
    assert_eq!(metrics.dead_letters("up1").get(), 0);
    let (record, body) = spool.load(id).unwrap().unwrap();
    assert_eq!(record.attempts, 0, "replay resets the attempt count");
    assert_eq!(
        &body[..],
        br#"{"event_id":"e1"}"#,
        "dead letters keep their event's bytes"
    );
    assert_eq!(spool.replay(Some(id)).await.unwrap(), 0);

    spool.finish(id, dead).await.unwrap();
    assert!(spool.purge(id).await.unwrap());
    assert!(!spool.purge(id).await.unwrap());
    assert_eq!(metrics.dead_letters("up1").get(), 0);
}

#[tokio::test]
async fn concurrent_appends_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = open(dir.path());
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let spool = spool.clone();
            tokio::spawn(async move { spool.append(event(&format!("e{i}"))).await })
        })
        .collect();
    for t in tasks {
        assert!(matches!(t.await.unwrap().unwrap(), Appended::Accepted(_)));
    }
    assert_eq!(spool.counts().unwrap().events, 200);
    assert_eq!(
        spool.due("a/up2", now_ms(), 1000, &none()).unwrap().len(),
        200
    );
}

#[tokio::test]
async fn in_flight_deliveries_can_be_skipped_when_listing() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = open(dir.path());
    spool.append(event("e1")).await.unwrap();
    spool.append(event("e2")).await.unwrap();
    let all = spool.due("a/up1", now_ms(), 10, &none()).unwrap();
    let skip: HashSet<u64> = [all[0]].into();
    assert_eq!(
        spool.due("a/up1", now_ms(), 10, &skip).unwrap(),
        vec![all[1]]
    );
    assert!(spool
        .next_due_ms("a/up1", &all.iter().copied().collect())
        .unwrap()
        .is_none());
}

fn segments(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("seg-"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_torn_tail_is_truncated_and_everything_before_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (spool, _) = open(dir.path());
        for id in ["t1", "t2", "t3"] {
            spool.append(event(id)).await.unwrap();
        }
    }
    let path = dir.path().join(&segments(dir.path())[0]);
    let whole = std::fs::metadata(&path).unwrap().len();
    // A crash in the middle of writing a batch: a header and part of a body.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut file, &[200, 0, 0, 0, 1, 2, 3, 4, 1, 9, 9]).unwrap();
    drop(file);
    let (spool, _) = open(dir.path());
    assert_eq!(spool.counts().unwrap().events, 3);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        whole,
        "the partial write is cut off"
    );
    assert!(matches!(
        spool.append(event("t4")).await.unwrap(),
        Appended::Accepted(_)
    ));
    drop(spool);
    let (spool, _) = open(dir.path());
    assert_eq!(spool.counts().unwrap().events, 4);
    assert_eq!(
        spool.append(event("t3")).await.unwrap(),
        Appended::Duplicate
    );
}

#[tokio::test]
async fn damage_before_the_last_segment_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (spool, _) = open(dir.path());
        spool.append(event("d1")).await.unwrap();
    }
    let first = dir.path().join(&segments(dir.path())[0]);
    let mut bytes = std::fs::read(&first).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&first, bytes).unwrap();
    std::fs::write(dir.path().join("seg-0000000002.log"), b"").unwrap();
    let err = Spool::open(dir.path(), Duration::from_secs(60), metrics())
        .err()
        .unwrap();
    assert!(
        matches!(&err, SpoolError::Storage(m) if m.contains("seg-0000000001.log is damaged (checksum mismatch")),
        "{err}"
    );
}

#[tokio::test]
async fn one_process_per_spool() {
    let dir = tempfile::tempdir().unwrap();
    let (_spool, _) = open(dir.path());
    let err = Spool::open(dir.path(), Duration::from_secs(60), metrics())
        .err()
        .unwrap();
    assert!(
        matches!(&err, SpoolError::Locked(m) if m.ends_with("is in use by another actiongate process")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_can_wait_for_the_old_one_to_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = open(dir.path());
    let dedup = Duration::from_secs(60);
    let held = Spool::open_after(dir.path(), dedup, metrics(), Duration::from_millis(50));
    assert!(matches!(held, Err(SpoolError::Locked(_))));

    let path = dir.path().to_path_buf();
    let waiter = std::thread::spawn(move || {
        Spool::open_after(&path, dedup, metrics(), Duration::from_secs(30)).map(|_| ())
    });
    drop(spool);
    waiter.join().expect("waiter").expect("opened once let go");
}

#[tokio::test]
async fn finished_segments_are_deleted_and_their_dedup_keys_carried_forward() {
    let dir = tempfile::tempdir().unwrap();
    {
        // Tiny segments: every batch seals one.
        let spool = Spool::open_sized(
            dir.path(),
            Duration::from_secs(3600),
            metrics(),
            Commit::Durable,
            64,
        )
        .unwrap();
        for id in ["s1", "s2", "s3"] {
            spool.append(event(id)).await.unwrap();
        }
        for lane in ["a/up1", "a/up2"] {
            for id in spool.due(lane, now_ms(), 10, &none()).unwrap() {
                spool
                    .finish(
                        id,
                        Finish::Delivered {
                            at_ms: now_ms(),
                            status: 200,
                        },
                    )
                    .await
                    .unwrap();
            }
        }
        // One more batch runs the clean-up after the last finish.
        spool.append(event("s4")).await.unwrap();
        assert_eq!(spool.counts().unwrap().events, 1);
    }
    let names = segments(dir.path());
    assert!(names.len() <= 3, "finished segments are deleted: {names:?}");
    let (spool, _) = open(dir.path());
    for id in ["s1", "s2", "s3", "s4"] {
        assert_eq!(
            spool.append(event(id)).await.unwrap(),
            Appended::Duplicate,
            "{id}"
        );
    }
    let pending = spool.due("a/up1", now_ms(), 10, &none()).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(spool.load(pending[0]).unwrap().unwrap().0.event_id, "s4");
}

#[tokio::test]
async fn after_a_failed_write_every_change_is_refused_and_the_failure_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = open(dir.path());
    spool.append(event("f1")).await.unwrap();
    assert_eq!(spool.failure(), None);
    // What the writer does when write() or fdatasync() fails.
    let failure = SpoolError::Storage("fsync: No space left on device".into());
    spool.shared.inner.fail(&failure);
    assert_eq!(spool.failure(), Some(failure.clone()));
    assert_eq!(spool.append(event("f2")).await, Err(failure.clone()));
    let id = spool.due("a/up1", now_ms(), 1, &none()).unwrap()[0];
    let delivered = Finish::Delivered {
        at_ms: now_ms(),
        status: 200,
    };
    assert_eq!(spool.finish(id, delivered).await, Err(failure));
    // Nothing changed: reads still see what was stored before the failure.
    assert_eq!(spool.counts().unwrap().events, 1);
    assert_eq!(spool.due("a/up1", now_ms(), 10, &none()).unwrap(), vec![id]);
}

#[tokio::test]
async fn attempt_results_alone_are_written_without_an_fsync_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fsyncs = |metrics: &Metrics| {
        let text = String::from_utf8(metrics.encode()).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("actiongate_spool_commit_batch_size_count "))
            .map(|v| v.parse::<u64>().unwrap())
            .unwrap_or(0)
    };
    {
        let (spool, metrics) = open(dir.path());
        spool.append(event("e1")).await.unwrap();
        assert_eq!(fsyncs(&metrics), 1, "an accepted event is fsynced");
        let ids = spool.due("a/up1", now_ms(), 10, &none()).unwrap();
        let delivered = Finish::Delivered {
            at_ms: now_ms(),
            status: 200,
        };
        spool.finish(ids[0], delivered).await.unwrap();
        assert_eq!(fsyncs(&metrics), 1, "a result alone is not fsynced");
        spool.append(event("e2")).await.unwrap();
        assert_eq!(fsyncs(&metrics), 2);
    }
    // Written all the same: a process restart (no power cut) finds the result.
    let (spool, _) = open(dir.path());
    assert_eq!(spool.due("a/up1", now_ms(), 10, &none()).unwrap().len(), 1);
    assert_eq!(spool.counts().unwrap().pending, 3);
}
