//! The audit log: one JSON object per line, in a hash chain.
//!
//! Each record carries a sequence number, the time, the agent (name, profile and version),
//! the kind of event and its details, the SHA-256 of the record before it (`prev`) and its
//! own (`hash`): the SHA-256 of the record's canonical encoding without `hash` (JSON with
//! keys in sorted order and no spaces, as `serde_json` writes a `Value`). A changed byte
//! changes that record's hash; a removed or moved record breaks the `prev` link of the one
//! after it. The chain goes on across rotation (the first record of a new file links to the
//! last of the old) and across daemon restarts (the daemon reads the last record when it
//! opens the log). `agentd audit verify` walks the chain and names the first record that was
//! changed, removed or reordered.
//!
//! Denials and control actions are written one record each, never sampled. Allowed events
//! that can come in floods (DNS answers) go through an [`Aggregator`]: one record per agent,
//! kind and destination per interval, with a count.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// How long a writer waits for another to finish its record.
const LOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// `prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who a record is about.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Subject {
    pub agent: Option<String>,
    pub profile: Option<String>,
    pub version: Option<String>,
}

impl Subject {
    pub fn daemon() -> Self {
        Subject::default()
    }
}

/// SHA-256 (hex) of a record's canonical encoding without its `hash`.
pub fn hash_of(record: &Value) -> String {
    let mut r = record.clone();
    if let Some(o) = r.as_object_mut() {
        o.remove("hash");
    }
    // A `Value`'s object keeps its keys sorted (serde_json without `preserve_order`), so
    // this encoding does not depend on how the record was written.
    let bytes = serde_json::to_vec(&r).expect("a JSON value encodes");
    let digest = Sha256::digest(&bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The files of a log at `path`, oldest first: `path.N` … `path.1`, `path`.
pub fn files_of(path: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(u32, PathBuf)> = Vec::new();
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
        let prefix = format!("{}.", name.to_string_lossy());
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(k) = n.strip_prefix(&prefix).and_then(|k| k.parse::<u32>().ok()) {
                    rotated.push((k, e.path()));
                }
            }
        }
    }
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        out.push(path.to_path_buf());
    }
    out
}

/// The last line of a file that is a record, if any.
fn last_record(path: &Path) -> Result<Option<Value>> {
    let Ok(f) = File::open(path) else {
        return Ok(None);
    };
    let mut last = None;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        last = Some((i + 1, line));
    }
    let Some((n, line)) = last else {
        return Ok(None);
    };
    let v: Value = serde_json::from_str(&line).with_context(|| {
        format!(
            "{}:{n}: the last line is not an audit record; the chain cannot go on from it \
             (`agentd audit verify` tells more; move the file away to start a new chain)",
            path.display()
        )
    })?;
    Ok(Some(v))
}

/// The writer: appends records, rotates by size, keeps the chain.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    /// `<path>.lock`: what writers flock (never the log itself, which rotates, and which a
    /// reader could lock).
    lock: File,
    size: u64,
    seq: u64,
    prev: String,
    max_bytes: u64,
    keep: u32,
    /// A torn last line cut off by [`AuditLog::catch_up`], to be said in the next record.
    pending_repair: Option<Vec<u8>>,
}

/// The bytes after the last newline of `path`, if it does not end with one.
fn torn_tail(path: &Path) -> Result<Option<Vec<u8>>> {
    let Ok(bytes) = fs::read(path) else {
        return Ok(None);
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(None);
    }
    let start = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    Ok(Some(bytes[start..].to_vec()))
}

impl AuditLog {
    /// Opens (creates) the log at `path` and goes on from its last record (or from the last
    /// record of the newest rotated file, if the current one is empty).
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> Result<AuditLog> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = Self::open_file(path)?;
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = {
            use std::os::unix::fs::OpenOptionsExt as _;
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&lock_path)
                .with_context(|| format!("opening {}", lock_path.display()))?
        };
        let mut log = AuditLog {
            path: path.to_path_buf(),
            file,
            lock,
            // Unknown until read under the lock: another writer may be in the middle of a
            // record, which must not be taken for a torn line.
            size: u64::MAX,
            seq: 0,
            prev: GENESIS.to_string(),
            max_bytes: max_bytes.max(1024),
            keep: keep.max(1),
            pending_repair: None,
        };
        match log.lock_within(Duration::from_millis(200)) {
            Ok(()) => log.unlock(),
            // Held by a stopped writer: read at the first append instead.
            Err(e) if format!("{e:#}").contains("another writer holds it") => {}
            Err(e) => return Err(e),
        }
        Ok(log)
    }

    /// Reads where the chain stands from the files (the last record written by anyone).
    /// A last line cut short (a crash or a full disk in the middle of a write) is cut off,
    /// and said so in a record, so that the chain goes on from the last whole record.
    fn catch_up(&mut self) -> Result<()> {
        let torn = torn_tail(&self.path)?;
        if let Some(bytes) = torn {
            let keep = fs::metadata(&self.path)?.len() - bytes.len() as u64;
            OpenOptions::new()
                .write(true)
                .open(&self.path)?
                .set_len(keep)
                .with_context(|| {
                    format!("cutting the torn last line of {}", self.path.display())
                })?;
            self.pending_repair = Some(bytes);
        }
        let mut last = None;
        for f in files_of(&self.path).iter().rev() {
            if let Some(v) = last_record(f)? {
                last = Some(v);
                break;
            }
        }
        (self.seq, self.prev) = match last {
            Some(v) => (
                v["seq"].as_u64().unwrap_or(0),
                v["hash"].as_str().unwrap_or(GENESIS).to_string(),
            ),
            None => (0, GENESIS.to_string()),
        };
        self.size = self.file.metadata()?.len();
        Ok(())
    }

    /// Takes the log's lock (the daemon and `agentd kill --direct` may both write) and makes
    /// sure this writer goes on from the last record, whoever wrote it: another writer may
    /// have appended or rotated meanwhile.
    fn lock(&mut self) -> Result<()> {
        self.lock_within(LOCK_TIMEOUT)
    }

    fn lock_within(&mut self, wait: Duration) -> Result<()> {
        use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
        // Bounded: a writer stopped while it holds the lock (a daemon under SIGSTOP) must
        // not hang `agentd kill --direct`.
        let deadline = Instant::now() + wait;
        // SAFETY: flock on a descriptor we own.
        while unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) || Instant::now() >= deadline {
                return Err(e).with_context(|| {
                    format!(
                        "locking the audit log {} (another writer holds it)",
                        self.path.display()
                    )
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let ours = self.file.metadata()?;
        let current =
            fs::metadata(&self.path).is_ok_and(|m| m.ino() == ours.ino() && m.dev() == ours.dev());
        if !current {
            // Rotated by another writer.
            self.file = Self::open_file(&self.path)?;
            self.catch_up()?;
        } else if ours.len() != self.size {
            self.catch_up()?;
        }
        Ok(())
    }

    fn unlock(&self) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_UN) };
    }

    fn open_file(path: &Path) -> Result<File> {
        use std::os::unix::fs::OpenOptionsExt as _;
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .with_context(|| format!("opening the audit log {}", path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sequence number of the last record written.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Appends one record; with `sync`, it is on disk (fdatasync) when this returns.
    /// Returns the record as written.
    pub fn append(
        &mut self,
        subject: &Subject,
        kind: &str,
        details: Value,
        sync: bool,
    ) -> Result<Value> {
        self.append_at(SystemTime::now(), subject, kind, details, sync)
    }

    pub fn append_at(
        &mut self,
        time: SystemTime,
        subject: &Subject,
        kind: &str,
        details: Value,
        sync: bool,
    ) -> Result<Value> {
        self.lock()?;
        let written = self
            .take_pending()
            .and_then(|()| self.note_repair())
            .and_then(|()| self.write_locked(time, subject, kind, details, sync));
        self.unlock();
        written
    }

    /// Where a writer that cannot get the lock (a daemon stopped while it holds it) leaves
    /// its records: the next writer that holds the lock moves them into the chain.
    pub fn pending_path(&self) -> PathBuf {
        PathBuf::from(format!("{}.pending", self.path.display()))
    }

    /// [`AuditLog::append`], or, if the lock cannot be had in time, the record on disk in
    /// the pending file (synced), to join the chain with the next record written. Returns
    /// whether it had to wait there.
    pub fn append_or_leave(
        &mut self,
        subject: &Subject,
        kind: &str,
        details: Value,
    ) -> Result<bool> {
        match self.append(subject, kind, details.clone(), true) {
            Ok(_) => Ok(false),
            Err(locked) if format!("{locked:#}").contains("another writer holds it") => {
                use std::os::unix::fs::OpenOptionsExt as _;
                let pending = self.pending_path();
                let line = json!({
                    "time": rfc3339(SystemTime::now()),
                    "agent": subject.agent,
                    "profile": subject.profile,
                    "version": subject.version,
                    "kind": kind,
                    "details": details,
                });
                let mut f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(&pending)
                    .with_context(|| format!("opening {}", pending.display()))?;
                f.write_all(format!("{line}\n").as_bytes())
                    .and_then(|()| f.sync_data())
                    .with_context(|| format!("writing {}", pending.display()))?;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Says in the chain that a torn last line was cut off (and what it held).
    fn note_repair(&mut self) -> Result<()> {
        if let Some(bytes) = self.pending_repair.take() {
            self.write_locked(
                SystemTime::now(),
                &Subject::daemon(),
                "log_repaired",
                json!({"cut": String::from_utf8_lossy(&bytes), "bytes": bytes.len()}),
                true,
            )?;
        }
        Ok(())
    }

    /// Moves records left in the pending file into the chain (under the lock), each with
    /// the time it was left there.
    fn take_pending(&mut self) -> Result<()> {
        let pending = self.pending_path();
        let Ok(text) = fs::read_to_string(&pending) else {
            return Ok(());
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                // Kept as text: a record is never dropped.
                self.write_locked(
                    SystemTime::now(),
                    &Subject::daemon(),
                    "pending_unreadable",
                    json!({"line": line}),
                    false,
                )?;
                continue;
            };
            let subject = Subject {
                agent: v["agent"].as_str().map(str::to_string),
                profile: v["profile"].as_str().map(str::to_string),
                version: v["version"].as_str().map(str::to_string),
            };
            let mut details = v["details"].clone();
            if let Some(o) = details.as_object_mut() {
                o.insert("left_pending_at".into(), v["time"].clone());
            }
            self.write_locked(
                SystemTime::now(),
                &subject,
                v["kind"].as_str().unwrap_or("pending"),
                details,
                false,
            )?;
        }
        self.file.sync_data()?;
        fs::remove_file(&pending).with_context(|| format!("removing {}", pending.display()))?;
        Ok(())
    }

    fn write_locked(
        &mut self,
        time: SystemTime,
        subject: &Subject,
        kind: &str,
        details: Value,
        sync: bool,
    ) -> Result<Value> {
        let mut record = json!({
            "seq": self.seq + 1,
            "time": rfc3339(time),
            "agent": subject.agent,
            "profile": subject.profile,
            "version": subject.version,
            "kind": kind,
            "details": details,
            "prev": self.prev,
        });
        let hash = hash_of(&record);
        record["hash"] = Value::String(hash.clone());
        let mut line = serde_json::to_vec(&record)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        // One write of a whole line (O_APPEND): a reader never sees half a record.
        self.file
            .write_all(&line)
            .with_context(|| format!("writing the audit log {}", self.path.display()))?;
        if sync {
            self.file
                .sync_data()
                .with_context(|| format!("syncing the audit log {}", self.path.display()))?;
        }
        self.size += line.len() as u64;
        self.seq += 1;
        self.prev = hash;
        Ok(record)
    }

    /// `path` becomes `path.1` (and `path.k` becomes `path.k+1`; beyond `keep`, the oldest
    /// goes); the chain goes on in a new `path`.
    fn rotate(&mut self) -> Result<()> {
        self.file.sync_all()?;
        let numbered = |k: u32| PathBuf::from(format!("{}.{k}", self.path.display()));
        let _ = fs::remove_file(numbered(self.keep));
        for k in (1..self.keep).rev() {
            let from = numbered(k);
            if from.exists() {
                fs::rename(&from, numbered(k + 1))
                    .with_context(|| format!("rotating {}", from.display()))?;
            }
        }
        fs::rename(&self.path, numbered(1))
            .with_context(|| format!("rotating {}", self.path.display()))?;
        self.file = Self::open_file(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub ok: bool,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub files: Vec<PathBuf>,
    /// The first problem: where and what.
    pub problem: Option<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    /// The sequence number the record there carries, if it can be read.
    pub seq: Option<u64>,
    /// `changed`, `removed`, `reordered` or `unreadable`.
    pub what: String,
    pub message: String,
}

/// Opens the files of the log at `path` (oldest first) while no writer can rotate it: under
/// a shared lock on its `.lock` file, which writers take exclusively. Otherwise a rotation
/// between listing the files and opening them would shift their names, and a file would
/// be read twice or not at all (seen as records removed). Each file is read up to the
/// length it had then (a record being written after is not half read). If a writer holds
/// the lock for more than 2 s (stopped in the middle of a write), they are opened without.
pub fn open_log(path: &Path) -> Result<Vec<(PathBuf, std::io::Take<File>)>> {
    use std::io::Read as _;
    use std::os::fd::AsRawFd as _;
    let lock = File::open(format!("{}.lock", path.display())).ok();
    let locked = lock.as_ref().is_some_and(|l| {
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(l.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let opened = files_of(path)
        .into_iter()
        .map(|f| {
            let file = File::open(&f).with_context(|| format!("opening {}", f.display()))?;
            let len = file.metadata()?.len();
            Ok((f, file.take(len)))
        })
        .collect();
    if locked {
        // SAFETY: as above.
        unsafe { libc::flock(lock.as_ref().map_or(-1, |l| l.as_raw_fd()), libc::LOCK_UN) };
    }
    opened
}

/// Walks the chain through `files` (oldest first). The first record's `prev` is taken as
/// given (older files may have been rotated away), unless it is record 1.
pub fn verify(files: &[PathBuf]) -> Result<Verdict> {
    use std::io::Read as _;
    let opened = files
        .iter()
        .map(|f| {
            let file = File::open(f).with_context(|| format!("opening {}", f.display()))?;
            Ok((f.clone(), file.take(u64::MAX)))
        })
        .collect::<Result<Vec<_>>>()?;
    verify_open(opened)
}

/// [`verify`] of files already open.
pub fn verify_open(files: Vec<(PathBuf, std::io::Take<File>)>) -> Result<Verdict> {
    let mut lines: Vec<(PathBuf, usize, String)> = Vec::new();
    let names: Vec<PathBuf> = files.iter().map(|(f, _)| f.clone()).collect();
    for (f, file) in files {
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", f.display()))?;
            if !line.trim().is_empty() {
                lines.push((f.clone(), i + 1, line));
            }
        }
    }
    let mut verdict = Verdict {
        ok: true,
        records: 0,
        first_seq: None,
        last_seq: None,
        files: names,
        problem: None,
    };
    let parsed: Vec<Option<Value>> = lines
        .iter()
        .map(|(_, _, l)| serde_json::from_str::<Value>(l).ok())
        .collect();
    let mut prev: Option<(u64, String)> = None;
    for (i, (file, line, _)) in lines.iter().enumerate() {
        let fail = |seq: Option<u64>, what: &str, message: String| Problem {
            file: file.clone(),
            line: *line,
            seq,
            what: what.to_string(),
            message,
        };
        let Some(v) = &parsed[i] else {
            verdict.problem = Some(fail(
                None,
                "unreadable",
                "not a JSON record: it was changed or cut".into(),
            ));
            break;
        };
        let seq = v["seq"].as_u64();
        let (Some(seq), Some(hash), Some(p)) = (seq, v["hash"].as_str(), v["prev"].as_str()) else {
            verdict.problem = Some(fail(
                seq,
                "changed",
                "a record without seq, hash or prev: it was changed".into(),
            ));
            break;
        };
        if serde_json::to_string(v).ok().as_deref() != Some(lines[i].2.as_str()) {
            verdict.problem = Some(fail(
                Some(seq),
                "changed",
                format!(
                    "record {seq} was changed: it is not written as agentd writes records \
                     (spacing, key order, escapes or a repeated key)"
                ),
            ));
            break;
        }
        if hash_of(v) != hash {
            verdict.problem = Some(fail(
                Some(seq),
                "changed",
                format!("record {seq} was changed: its hash does not match its contents"),
            ));
            break;
        }
        let expected = match &prev {
            Some((s, h)) => Some((s + 1, h.as_str())),
            None if seq == 1 => Some((1, GENESIS)),
            None => None,
        };
        if let Some((want_seq, want_prev)) = expected
            && (seq != want_seq || p != want_prev)
        {
            let later = parsed[i + 1..]
                .iter()
                .flatten()
                .any(|r| r["seq"].as_u64() == Some(want_seq));
            let earlier = seq < want_seq;
            let (what, message) = if later || earlier {
                (
                    "reordered",
                    format!(
                        "record {seq} stands where record {want_seq} should: records were reordered"
                    ),
                )
            } else if seq > want_seq {
                (
                    "removed",
                    format!(
                        "record {seq} follows record {}: record{} {want_seq}{} removed",
                        want_seq - 1,
                        if seq - want_seq > 1 { "s" } else { "" },
                        if seq - want_seq > 1 {
                            format!(" to {} were", seq - 1)
                        } else {
                            " was".to_string()
                        }
                    ),
                )
            } else {
                (
                    "changed",
                    format!(
                        "record {seq} does not link to record {}: one of them was changed",
                        want_seq - 1
                    ),
                )
            };
            verdict.problem = Some(fail(Some(seq), what, message));
            break;
        }
        verdict.records += 1;
        verdict.first_seq.get_or_insert(seq);
        verdict.last_seq = Some(seq);
        prev = Some((seq, hash.to_string()));
    }
    verdict.ok = verdict.problem.is_none();
    Ok(verdict)
}

/// Allowed events counted per (agent, kind, destination) and written as one record each
/// per interval. The number of keys is bounded: beyond [`Aggregator::MAX_KEYS`], an
/// agent's further destinations are counted under `(other)`.
pub struct Aggregator {
    interval: Duration,
    since: Instant,
    counts: BTreeMap<(Subject, String, String), u64>,
}

impl Aggregator {
    pub const MAX_KEYS: usize = 10_000;

    pub fn new(interval: Duration) -> Self {
        Aggregator {
            interval,
            since: Instant::now(),
            counts: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, subject: &Subject, kind: &str, destination: &str) {
        let mut key = (subject.clone(), kind.to_string(), destination.to_string());
        if !self.counts.contains_key(&key) && self.counts.len() >= Self::MAX_KEYS {
            key.2 = "(other)".into();
        }
        *self.counts.entry(key).or_default() += 1;
    }

    /// True once the interval is over.
    pub fn due(&self, now: Instant) -> bool {
        now.duration_since(self.since) >= self.interval && !self.counts.is_empty()
    }

    /// The records of the interval, for [`AuditLog::append`]: (subject, kind, details).
    pub fn drain(&mut self, now: Instant) -> Vec<(Subject, String, Value)> {
        let secs = now.duration_since(self.since).as_secs_f64();
        self.since = now;
        std::mem::take(&mut self.counts)
            .into_iter()
            .map(|((subject, kind, destination), count)| {
                (
                    subject,
                    kind,
                    json!({"destination": destination, "count": count, "seconds": (secs * 1000.0).round() / 1000.0}),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of the test's own, removed when the test ends (also when it fails).
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("agentd-audit-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    fn who(a: &str) -> Subject {
        Subject {
            agent: Some(a.into()),
            profile: Some("default".into()),
            version: Some("1.0.0".into()),
        }
    }

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_798_761_600_123);
        assert_eq!(rfc3339(t), "2027-01-01T00:00:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn the_chain_survives_rotation_and_reopening() {
        let d = dir("rotate");
        let path = d.join("audit.jsonl");
        let mut log = AuditLog::open(&path, 2048, 20).unwrap();
        for i in 0..40 {
            log.append(&who("a"), "test", json!({"i": i}), false)
                .unwrap();
        }
        drop(log);
        let mut log = AuditLog::open(&path, 2048, 20).unwrap();
        assert_eq!(log.seq(), 40);
        log.append(&who("a"), "test", json!({"i": 40}), true)
            .unwrap();
        let files = files_of(&path);
        assert!(files.len() > 3, "{files:?}");
        let v = verify(&files).unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(
            (v.records, v.first_seq, v.last_seq),
            (41, Some(1), Some(41))
        );
    }

    /// `audit verify` of a live log while its writer rotates it: every snapshot is a whole
    /// chain (listing the files, then opening them, without the lock would sometimes skip
    /// or repeat a file whose name had shifted, and read a record half written).
    #[test]
    fn a_log_read_while_it_rotates_is_whole() {
        let d = dir("live");
        let path = d.join("audit.jsonl");
        let mut log = AuditLog::open(&path, 1500, 1000).unwrap();
        log.append(&who("w"), "test", json!({"i": 0}), false)
            .unwrap();
        let writer = std::thread::spawn(move || {
            for i in 1..1500 {
                log.append(&who("w"), "test", json!({"i": i}), false)
                    .unwrap();
            }
        });
        let mut reads = 0;
        while !writer.is_finished() || reads == 0 {
            let v = verify_open(open_log(&path).unwrap()).unwrap();
            assert!(v.ok, "read {reads}: {:?}", v.problem);
            assert_eq!(v.first_seq, Some(1));
            assert_eq!(Some(v.records), v.last_seq, "no gap");
            reads += 1;
        }
        writer.join().unwrap();
        assert!(files_of(&path).len() > 100, "it rotated while read");
    }

    #[test]
    fn two_writers_keep_one_chain() {
        let d = dir("writers");
        let path = d.join("audit.jsonl");
        let mut a = AuditLog::open(&path, 1500, 50).unwrap();
        let mut b = AuditLog::open(&path, 1500, 50).unwrap();
        for i in 0..30 {
            let w = if i % 3 == 0 { &mut b } else { &mut a };
            w.append(&who("x"), "test", json!({"i": i}), false).unwrap();
        }
        let files = files_of(&path);
        assert!(files.len() > 2, "rotated: {files:?}");
        let v = verify(&files).unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!((v.records, v.last_seq), (30, Some(30)));
    }

    /// A log with one record whose lock another writer holds (returned, to release it).
    fn held_by_another_writer(tag: &str) -> (Scratch, PathBuf, AuditLog) {
        use std::os::fd::AsRawFd as _;
        let d = dir(tag);
        let path = d.join("audit.jsonl");
        let mut holder = AuditLog::open(&path, 1 << 20, 2).unwrap();
        holder
            .append(&who("a"), "test", json!({"i": 0}), true)
            .unwrap();
        // SAFETY: flock on a descriptor the test owns.
        assert_eq!(
            unsafe { libc::flock(holder.lock.as_raw_fd(), libc::LOCK_EX) },
            0
        );
        (d, path, holder)
    }

    #[test]
    fn a_record_left_pending_joins_the_chain_with_the_next_one() {
        // Another writer holds the lock (as a daemon stopped mid-record would).
        let (_d, path, mut holder) = held_by_another_writer("pending");
        let mut cli = AuditLog::open(&path, 1 << 20, 2).unwrap();
        let waited = cli
            .append_or_leave(&who("b"), "kill", json!({"processes": 3}))
            .unwrap();
        assert!(waited, "left pending");
        assert!(cli.pending_path().exists());
        holder.unlock();
        holder
            .append(&who("a"), "test", json!({"i": 1}), false)
            .unwrap();
        assert!(!cli.pending_path().exists(), "moved into the chain");
        let text = fs::read_to_string(&path).unwrap();
        let kinds: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(kinds.len(), 3);
        assert_eq!(kinds[1]["kind"], "kill");
        assert_eq!(kinds[1]["agent"], "b");
        assert!(kinds[1]["details"]["left_pending_at"].is_string());
        assert!(verify(&[path]).unwrap().ok);
    }

    #[test]
    fn a_line_rewritten_to_the_same_value_is_a_change() {
        let d = dir("canonical");
        let path = d.join("audit.jsonl");
        let mut log = AuditLog::open(&path, 1 << 20, 2).unwrap();
        for i in 0..3 {
            log.append(&who("real"), "test", json!({"i": i}), false)
                .unwrap();
        }
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // A repeated key (the last one wins in serde_json: the value, and so the hash,
        // are the same) and extra spacing.
        for (n, changed) in [
            lines[1].replacen("{", "{\"agent\":\"fake\",", 1),
            lines[1].replacen(",", ", ", 1),
        ]
        .into_iter()
        .enumerate()
        {
            let f = d.join(format!("t{n}"));
            fs::write(&f, format!("{}\n{changed}\n{}\n", lines[0], lines[2])).unwrap();
            let v = verify(&[f]).unwrap();
            let p = v.problem.expect("found");
            assert_eq!((p.line, p.what.as_str()), (2, "changed"), "{}", p.message);
        }
    }

    #[test]
    fn a_line_being_written_by_another_writer_is_not_cut() {
        // The holder is in the middle of its next record (a reader may see half a write).
        let (_d, path, _holder) = held_by_another_writer("midwrite");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"agent\":\"a\",").unwrap();
        let before = fs::read(&path).unwrap();
        let _other = AuditLog::open(&path, 1 << 20, 2).unwrap();
        assert_eq!(
            fs::read(&path).unwrap(),
            before,
            "nothing cut while the lock is held"
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_and_said() {
        let d = dir("torn");
        let path = d.join("audit.jsonl");
        let mut log = AuditLog::open(&path, 1 << 20, 2).unwrap();
        log.append(&who("a"), "test", json!({"i": 0}), true)
            .unwrap();
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"ti").unwrap();
        let mut log = AuditLog::open(&path, 1 << 20, 2).unwrap();
        log.append(&who("a"), "test", json!({"i": 1}), true)
            .unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let records: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(records.len(), 3);
        assert_eq!(records[1]["kind"], "log_repaired");
        assert_eq!(records[1]["details"]["cut"], "{\"seq\":2,\"ti");
        assert!(verify(&[path]).unwrap().ok);
    }

    #[test]
    fn floats_read_back_to_the_same_hash() {
        let d = dir("floats");
        let path = d.join("audit.jsonl");
        let mut log = AuditLog::open(&path, 1 << 20, 2).unwrap();
        // Values that serde_json's default (faster) float parsing reads back one unit in
        // the last place off.
        for x in [
            1796.5342857142857,
            13774.558714285715,
            3318.6645714285714,
            0.1 + 0.2,
        ] {
            log.append(&who("a"), "kill", json!({"millis": x}), false)
                .unwrap();
        }
        let v = verify(&[path]).unwrap();
        assert!(v.ok, "{v:?}");
    }

    #[test]
    fn a_burst_of_allowed_events_is_aggregated_and_no_denial_is_lost() {
        let d = dir("aggregate");
        let path = d.join("audit.jsonl");
        let mut log = AuditLog::open(&path, 1 << 30, 2).unwrap();
        let mut agg = Aggregator::new(Duration::from_secs(1));
        let start = Instant::now();
        let mut denials = 0;
        for i in 0..100_000u32 {
            agg.add(&who("a"), "dns_answered", &format!("host{}.example", i % 3));
            if i % 100 == 0 {
                log.append(&who("a"), "net_denied", json!({"n": i}), false)
                    .unwrap();
                denials += 1;
            }
            // One event per (simulated) millisecond, flushed as the daemon does: once per
            // interval.
            let now = start + Duration::from_millis(u64::from(i));
            if agg.due(now) {
                for (s, k, det) in agg.drain(now) {
                    log.append(&s, &k, det, false).unwrap();
                }
            }
        }
        for (s, k, det) in agg.drain(Instant::now()) {
            log.append(&s, &k, det, false).unwrap();
        }
        let text = fs::read_to_string(&path).unwrap();
        let records: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let allowed: Vec<&Value> = records
            .iter()
            .filter(|r| r["kind"] == "dns_answered")
            .collect();
        let counted: u64 = allowed
            .iter()
            .map(|r| r["details"]["count"].as_u64().unwrap())
            .sum();
        assert_eq!(counted, 100_000, "every allowed event is counted");
        // 100 s at one flush a second, 3 destinations: at most 3 records a second.
        assert!(
            allowed.len() <= 3 * 101,
            "{} aggregated records",
            allowed.len()
        );
        let kept = records.iter().filter(|r| r["kind"] == "net_denied").count();
        assert_eq!(kept, denials, "every denial is kept");
        assert!(verify(&[path]).unwrap().ok);
    }

    #[test]
    fn keys_beyond_the_bound_are_counted_as_other() {
        let mut agg = Aggregator::new(Duration::from_secs(1));
        for i in 0..Aggregator::MAX_KEYS + 500 {
            agg.add(&who("a"), "dns_answered", &format!("h{i}"));
        }
        let out = agg.drain(Instant::now());
        assert_eq!(out.len(), Aggregator::MAX_KEYS + 1);
        let other = out
            .iter()
            .find(|(_, _, d)| d["destination"] == "(other)")
            .unwrap();
        assert_eq!(other.2["count"], 500);
    }
}
