//! Probe: can fjall 3 (embedded LSM) replace the gateway's hand-written append-only spool? Times group-committed durable appends, delivery finishes, and space reclaim.
//!
//! Usage: fjall-probe <append|single|drain|space|crash> [--nosync]
//! Each mode opens a fresh database under ./tmp (the checkout's disk), prints one result line, deletes the dir.
//!
//! Store layout (one fjall Database, three keyspaces):
//!   events      seq (u64 BE)                -> small header (action, event_id, upstreams) + ~4.4 KB JSON body
//!   deliveries  delivery id (u64 BE)        -> 60-byte record (id, event seq, attempts, due, upstream)
//!   dedup       "a\x1f<event_id>"           -> expiry (u64 BE)
//! Durability: every group of appends is ONE WriteBatch committed with
//! `.durability(Some(PersistMode::SyncData))`, i.e. journal write + fdatasync before any waiter is answered.
//! Finishes use the default batch durability (PersistMode::Buffer = write(2) to the OS, no fsync)
//! and one `db.persist(PersistMode::SyncData)` at the end.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::oneshot;

static BODY: &[u8] = include_bytes!("../body.json");
const MAX_GROUP: usize = 1024;

struct Store {
    db: Database,
    events: Keyspace,
    deliveries: Keyspace,
    dedup: Keyspace,
}

impl Store {
    fn open(dir: &Path) -> Store {
        // Defaults everywhere. (fjall's only durability knob is the PersistMode per batch / persist call.)
        let db = Database::builder(dir).open().unwrap();
        let events = db.keyspace("events", KeyspaceCreateOptions::default).unwrap();
        let deliveries = db.keyspace("deliveries", KeyspaceCreateOptions::default).unwrap();
        let dedup = db.keyspace("dedup", KeyspaceCreateOptions::default).unwrap();
        Store { db, events, deliveries, dedup }
    }
}

struct NewEvent {
    action: &'static str,
    event_id: String,
    body: &'static [u8],
    upstreams: Vec<&'static str>,
}

struct Req {
    event: NewEvent,
    reply: oneshot::Sender<u64>,
}

#[derive(Default, Clone)]
struct WriterStats {
    groups: u64,
    events: u64,
    commit_us: Vec<u64>, // per-group commit time (write + fdatasync)
}

fn encode_event(seq: u64, e: &NewEvent, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&seq.to_be_bytes());
    out.push(e.action.len() as u8);
    out.extend_from_slice(e.action.as_bytes());
    out.push(e.event_id.len() as u8);
    out.extend_from_slice(e.event_id.as_bytes());
    out.push(e.upstreams.len() as u8);
    for u in &e.upstreams {
        out.push(u.len() as u8);
        out.extend_from_slice(u.as_bytes());
    }
    out.extend_from_slice(e.body);
}

fn delivery_record(id: u64, seq: u64, attempts: u32, due: u64) -> [u8; 60] {
    let mut r = [0u8; 60];
    r[0..8].copy_from_slice(&id.to_be_bytes());
    r[8..16].copy_from_slice(&seq.to_be_bytes());
    r[16..20].copy_from_slice(&attempts.to_be_bytes());
    r[20..28].copy_from_slice(&due.to_be_bytes());
    r[28] = 1;
    r[29] = b'u';
    r
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The single writer: owns the store, drains up to MAX_GROUP queued requests, one batch, one fsync, answer all.
fn writer_loop(store: &Store, rx: mpsc::Receiver<Req>, sync: bool, mut next_seq: u64) -> WriterStats {
    let mut st = WriterStats::default();
    let mut group: Vec<Req> = Vec::with_capacity(MAX_GROUP);
    let mut buf = Vec::with_capacity(8192);
    while let Ok(first) = rx.recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let t = Instant::now();
        let mut batch = store.db.batch();
        let now = now_ms();
        let mut seqs = Vec::with_capacity(group.len());
        for r in &group {
            let seq = next_seq;
            next_seq += 1;
            encode_event(seq, &r.event, &mut buf);
            batch.insert(&store.events, &seq.to_be_bytes()[..], &buf[..]);
            // one delivery per upstream; delivery id == seq here (one upstream "u")
            batch.insert(&store.deliveries, &seq.to_be_bytes()[..], &delivery_record(seq, seq, 0, now)[..]);
            let mut dk = Vec::with_capacity(2 + r.event.event_id.len());
            dk.extend_from_slice(r.event.action.as_bytes());
            dk.push(0x1f);
            dk.extend_from_slice(r.event.event_id.as_bytes());
            batch.insert(&store.dedup, &dk[..], &(now + 86_400_000).to_be_bytes()[..]);
            seqs.push(seq);
        }
        let batch = if sync { batch.durability(Some(PersistMode::SyncData)) } else { batch };
        batch.commit().unwrap();
        st.commit_us.push(t.elapsed().as_micros() as u64);
        st.groups += 1;
        st.events += group.len() as u64;
        for (r, seq) in group.drain(..).zip(seqs) {
            let _ = r.reply.send(seq);
        }
    }
    st
}

fn cpu_time() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (allocated bytes like `du`, apparent bytes, journal allocated bytes, number of files)
fn disk_usage(dir: &Path) -> (u64, u64, u64, u64) {
    let (mut alloc, mut app, mut jnl, mut files) = (0, 0, 0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                alloc += m.blocks() * 512;
                app += m.len();
                files += 1;
                if e.path().extension().is_some_and(|x| x == "jnl") {
                    jnl += m.blocks() * 512;
                }
            }
        }
    }
    (alloc, app, jnl, files)
}

fn fresh_dir(mode: &str) -> PathBuf {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tmp");
    let d = base.join(format!("{mode}-{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Spawns the writer thread, runs `n` appends `conc` at a time from tokio tasks (rounds of `conc`, like
/// examples/spool_probe.rs), returns (wall, cpu, per-append latencies µs, writer stats, store).
fn run_appends(
    rt: &tokio::runtime::Runtime,
    store: Store,
    n: u64,
    conc: u64,
    sync: bool,
    first_seq: u64,
    id_prefix: &str,
) -> (Duration, Duration, Vec<u64>, WriterStats, Store) {
    let (tx, rx) = mpsc::channel::<Req>();
    let writer = std::thread::spawn(move || {
        let st = writer_loop(&store, rx, sync, first_seq);
        (st, store)
    });
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let lat: Vec<u64> = rt.block_on(async {
        let mut lat = Vec::with_capacity(n as usize);
        for round in 0..n.div_ceil(conc) {
            let this_round = conc.min(n - round * conc);
            let tasks: Vec<_> = (0..this_round)
                .map(|i| {
                    let tx = tx.clone();
                    let event = NewEvent {
                        action: "a",
                        event_id: format!("{id_prefix}e{round}-{i}"),
                        body: BODY,
                        upstreams: vec!["u"],
                    };
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let (rtx, rrx) = oneshot::channel();
                        tx.send(Req { event, reply: rtx }).unwrap();
                        rrx.await.unwrap();
                        t.elapsed().as_micros() as u64
                    })
                })
                .collect();
            for t in tasks {
                lat.push(t.await.unwrap());
            }
        }
        lat
    });
    let wall = t0.elapsed();
    let cpu = cpu_time() - cpu0;
    drop(tx);
    let (st, store) = writer.join().unwrap();
    (wall, cpu, lat, st, store)
}

/// Finishes deliveries for seqs in `seqs`: point-read body, then batch(delete delivery + event), `per_batch`
/// finishes per batch, default durability (Buffer, no fsync), one persist(SyncData) at the end.
fn run_finishes(store: &Store, seqs: impl Iterator<Item = u64>, per_batch: usize) -> (u64, Duration, Duration, u64) {
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let mut n = 0u64;
    let mut bytes_read = 0u64;
    let mut batch = store.db.batch();
    let mut in_batch = 0;
    for seq in seqs {
        let k = seq.to_be_bytes();
        let body = store.events.get(k).unwrap().expect("body missing");
        bytes_read += body.len() as u64;
        batch.remove(&store.deliveries, &k[..]);
        batch.remove(&store.events, &k[..]);
        in_batch += 1;
        n += 1;
        if in_batch == per_batch {
            std::mem::replace(&mut batch, store.db.batch()).commit().unwrap();
            in_batch = 0;
        }
    }
    batch.commit().unwrap();
    store.db.persist(PersistMode::SyncData).unwrap();
    (n, t0.elapsed(), cpu_time() - cpu0, bytes_read)
}

/// Child of `crash`: appends forever (32 at a time, fsync per group) into `dir`, printing the highest
/// acknowledged seq after each round. Acked seqs 1..=k are contiguous because each round is awaited fully.
fn crash_child(dir: &Path) {
    use std::io::Write;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut store = Store::open(dir);
    let mut seq = 1u64;
    let mut out = std::io::stdout().lock();
    loop {
        let (_, _, _, _, s) = run_appends(&rt, store, 32, 32, true, seq, &format!("s{seq}-"));
        store = s;
        seq += 32;
        writeln!(out, "{}", seq - 1).unwrap();
        out.flush().unwrap();
    }
}

/// `crash`: run crash_child, SIGKILL it after ~2 s, reopen the dir and check every acked event is present
/// in all three keyspaces. Covers kill -9 (process crash) only, not power loss.
fn crash_parent(dir: &Path) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("crash-child")
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let pid = child.id() as i32;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2000));
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let mut acked = 0u64;
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        acked = line.trim().parse().unwrap_or(acked);
    }
    let status = child.wait().unwrap();
    let (alloc, _, jnl, _) = disk_usage(dir);
    let t = Instant::now();
    let store = Store::open(dir);
    let open = t.elapsed();
    let mut missing = 0;
    for seq in 1..=acked {
        let k = seq.to_be_bytes();
        if store.events.get(k).unwrap().is_none() || store.deliveries.get(k).unwrap().is_none() {
            missing += 1;
        }
    }
    let dedup = store.dedup.len().unwrap();
    let mut extra = 0;
    while store.events.get((acked + extra + 1).to_be_bytes()).unwrap().is_some() {
        extra += 1;
    }
    println!(
        "crash: child {status}, acked={acked}, missing_after_reopen={missing}, unacked_but_present={extra}, dedup_keys={dedup}, reopen(journal replay) {:.0}ms, du before reopen {:.1}MiB (journal {:.1}MiB)",
        open.as_secs_f64() * 1e3,
        mib(alloc),
        mib(jnl)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("append");
    if mode == "crash-child" {
        crash_child(Path::new(&args[2]));
        return;
    }
    if mode == "crash" {
        let dir = fresh_dir(mode);
        crash_parent(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    }
    let sync = !args.iter().any(|a| a == "--nosync");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = fresh_dir(mode);
    let store = Store::open(&dir);
    let tag = if sync { "sync" } else { "nosync" };

    match mode {
        "append" => {
            let n = 6400;
            let (wall, cpu, mut lat, mut st, store) = run_appends(&rt, store, n, 32, sync, 1, "");
            let (alloc, _, jnl, _) = disk_usage(&dir);
            println!(
                "append[{tag}] n={n} conc=32: wall={:.1}ms {:.1}us/event {:.0} events/s | cpu {:.1}us/event | \
                 groups={} mean_group={:.1} commit p50={}us p99={}us max={}us | \
                 req latency p50={}us p99={}us | du={:.1}MiB (journal {:.1}MiB) rss={}KiB",
                wall.as_secs_f64() * 1e3,
                wall.as_secs_f64() * 1e6 / n as f64,
                n as f64 / wall.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / n as f64,
                st.groups,
                st.events as f64 / st.groups as f64,
                pct(&mut st.commit_us, 0.5),
                pct(&mut st.commit_us, 0.99),
                pct(&mut st.commit_us, 1.0),
                pct(&mut lat, 0.5),
                pct(&mut lat, 0.99),
                mib(alloc),
                mib(jnl),
                rss_kib()
            );
            drop(store);
        }
        "single" => {
            // 20 warm-up appends, not counted
            let (_, _, _, _, store) = run_appends(&rt, store, 20, 1, sync, 1, "w");
            let n = 500;
            let (wall, cpu, mut lat, mut st, store) = run_appends(&rt, store, n, 1, sync, 21, "");
            let mean = lat.iter().sum::<u64>() as f64 / lat.len() as f64;
            println!(
                "single[{tag}] n={n} conc=1: mean={mean:.0}us p50={}us p99={}us max={}us | commit p50={}us | \
                 cpu {:.1}us/event | wall={:.1}ms",
                pct(&mut lat, 0.5),
                pct(&mut lat, 0.99),
                pct(&mut lat, 1.0),
                pct(&mut st.commit_us, 0.5),
                cpu.as_secs_f64() * 1e6 / n as f64,
                wall.as_secs_f64() * 1e3,
            );
            drop(store);
        }
        "drain" => {
            let n = 30_000;
            let (awall, acpu, _, _, store) = run_appends(&rt, store, n, 32, sync, 1, "");
            let (fin, wall, cpu, read) = run_finishes(&store, 1..=n, 32);
            let (alloc, _, jnl, _) = disk_usage(&dir);
            println!(
                "drain[{tag}] appended {n} in {:.0}ms ({:.1}us/event, cpu {:.1}us/event) | finished {fin} in {:.0}ms: \
                 {:.0} finishes/s, cpu {:.1}us/finish, read {:.1}MiB | du={:.1}MiB (journal {:.1}MiB) rss={}KiB",
                awall.as_secs_f64() * 1e3,
                awall.as_secs_f64() * 1e6 / n as f64,
                acpu.as_secs_f64() * 1e6 / n as f64,
                wall.as_secs_f64() * 1e3,
                fin as f64 / wall.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / fin as f64,
                mib(read),
                mib(alloc),
                mib(jnl),
                rss_kib()
            );
            drop(store);
        }
        "space" => {
            let n = 100_000u64;
            let keep = 1_000u64;
            let (awall, acpu, _, mut st, store) = run_appends(&rt, store, n, 32, sync, 1, "");
            let (a0, _, j0, _) = disk_usage(&dir);
            let rss0 = rss_kib();
            // finish all but the oldest `keep`
            let (fin, fwall, fcpu, _) = run_finishes(&store, keep + 1..=n, 32);
            let (a1, ap1, j1, f1) = disk_usage(&dir);
            let rss1 = rss_kib();
            // 1) let background flush/compaction settle by itself (poll up to 60 s)
            let t = Instant::now();
            let mut quiet = 0;
            while t.elapsed() < Duration::from_secs(60) && quiet < 20 {
                if store.db.outstanding_flushes() == 0 && store.db.active_compactions() == 0 {
                    quiet += 1;
                } else {
                    quiet = 0;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let settle = t.elapsed();
            let (a2, _, j2, f2) = disk_usage(&dir);
            // 2) force it: flush memtables (frees journals), then major compaction of each keyspace
            //    (rotate_memtable_and_wait and major_compact are #[doc(hidden)] in fjall 3.1)
            let t = Instant::now();
            let cpu_c0 = cpu_time();
            for ks in [&store.events, &store.deliveries, &store.dedup] {
                ks.rotate_memtable_and_wait().unwrap();
            }
            for ks in [&store.events, &store.deliveries, &store.dedup] {
                ks.major_compact().unwrap();
            }
            let ctime = t.elapsed();
            let ccpu = cpu_time() - cpu_c0;
            std::thread::sleep(Duration::from_secs(2));
            let (a3, ap3, j3, f3) = disk_usage(&dir);
            let rss3 = rss_kib();
            // 3) old table files stay on disk until the version history is GC'd, which runs on the tree's
            //    next flush/compaction: do one tiny write per keyspace and flush again.
            let t = Instant::now();
            for ks in [&store.events, &store.deliveries, &store.dedup] {
                ks.insert("zz-nudge", "x").unwrap();
                ks.rotate_memtable_and_wait().unwrap();
            }
            std::thread::sleep(Duration::from_secs(1));
            let (a4, _, j4, f4) = disk_usage(&dir);
            let nudge = t.elapsed();
            let rss4 = rss_kib();
            let slow = st.commit_us.iter().filter(|&&u| u > 10_000).count();
            let commit_p99 = pct(&mut st.commit_us, 0.99);
            // sanity: pending events still readable, finished gone
            assert!(store.events.get(1u64.to_be_bytes()).unwrap().is_some());
            assert!(store.events.get(keep.to_be_bytes()).unwrap().is_some());
            assert!(store.events.get((keep + 1).to_be_bytes()).unwrap().is_none());
            println!(
                "space[{tag}] append {n}: {:.1}us/event cpu {:.1}us/event, commit max {}us, du={:.0}MiB (jnl {:.0}) rss={}MiB | \
                 finish {fin}: {:.0}/s cpu {:.1}us | after finish du={:.0}MiB (jnl {:.0}, apparent {:.0}, {f1} files) rss={}MiB | \
                 settled {:.1}s du={:.0}MiB (jnl {:.0}, {f2} files) | forced flush+major_compact {:.1}s cpu {:.1}s: \
                 du={:.1}MiB (jnl {:.1}, apparent {:.1}, {f3} files) rss={}MiB | after 1 more write+flush per keyspace ({:.1}s): \
                 du={:.1}MiB (jnl {:.1}, {f4} files) rss={}MiB | journals={} tables ev/dl/dd={}/{}/{} db.disk_space={:.1}MiB | \
                 append commit p99={}us, {} of {} groups >10ms",
                awall.as_secs_f64() * 1e6 / n as f64,
                acpu.as_secs_f64() * 1e6 / n as f64,
                pct(&mut st.commit_us, 1.0),
                mib(a0),
                mib(j0),
                rss0 / 1024,
                fin as f64 / fwall.as_secs_f64(),
                fcpu.as_secs_f64() * 1e6 / fin as f64,
                mib(a1),
                mib(j1),
                mib(ap1),
                rss1 / 1024,
                settle.as_secs_f64(),
                mib(a2),
                mib(j2),
                ctime.as_secs_f64(),
                ccpu.as_secs_f64(),
                mib(a3),
                mib(j3),
                mib(ap3),
                rss3 / 1024,
                nudge.as_secs_f64(),
                mib(a4),
                mib(j4),
                rss4 / 1024,
                store.db.journal_count(),
                store.events.table_count(),
                store.deliveries.table_count(),
                store.dedup.table_count(),
                mib(store.db.disk_space().unwrap()),
                commit_p99,
                slow,
                st.groups,
            );
            // 4) close and reopen: recovery time and size after a clean restart
            drop(store);
            let t = Instant::now();
            let store = Store::open(&dir);
            let reopen = t.elapsed();
            let (a5, _, j5, f5) = disk_usage(&dir);
            println!(
                "space[{tag}] reopen after clean close: open {:.0}ms, du={:.1}MiB (jnl {:.1}, {f5} files), pending events={}",
                reopen.as_secs_f64() * 1e3,
                mib(a5),
                mib(j5),
                store.events.len().unwrap()
            );
            drop(store);
        }
        other => {
            eprintln!("unknown mode {other}; use append|single|drain|space|crash [--nosync]");
            std::process::exit(2);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
