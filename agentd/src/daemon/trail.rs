//! The daemon's side of the audit trail: every record goes to the audit log
//! ([`crate::audit`]), to the recent records that `agentd events` shows first, and to
//! the live feed `agentd events --follow` reads; the metrics count alongside.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde_json::Value;

use super::{Daemon, Locked as _, agents::AgentState};
use crate::audit::{Aggregator, AuditLog, Subject};

/// Records kept for `agentd events` without `--follow`.
pub const RECENT: usize = 1000;

/// How long an ended agent's name is kept for its late kernel events.
const ENDED_FOR: Duration = Duration::from_secs(120);

pub struct Trail {
    pub log: Mutex<AuditLog>,
    pub aggregator: Mutex<Aggregator>,
    pub recent: Mutex<VecDeque<Value>>,
    pub feed: tokio::sync::broadcast::Sender<Value>,
    /// Agents that ended, by id: kernel events may arrive after their teardown.
    ended: Mutex<HashMap<u64, (Subject, Instant)>>,
    /// The kernel's count of dropped records when last looked at.
    lost_seen: std::sync::atomic::AtomicU64,
}

impl Trail {
    pub fn new(log: AuditLog, aggregate: Duration) -> Trail {
        Trail {
            log: Mutex::new(log),
            aggregator: Mutex::new(Aggregator::new(aggregate)),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            feed: tokio::sync::broadcast::channel(4096).0,
            ended: Mutex::new(HashMap::new()),
            lost_seen: 0.into(),
        }
    }
}

/// Who `a` is, for a record.
pub fn subject(a: &AgentState) -> Subject {
    let live = a.live.locked();
    Subject {
        agent: Some(a.name.clone()),
        profile: Some(live.policy.profile.clone()),
        version: Some(live.policy.version.to_string()),
    }
}

impl Daemon {
    /// Writes one record (with `sync`, on disk before this returns), shows it to
    /// followers. An error is logged and returned.
    pub fn audit(&self, subject: &Subject, kind: &str, details: Value, sync: bool) -> Result<()> {
        // Published while the log is held: followers see records in their order.
        let mut log = self.trail.log.locked();
        match log.append(subject, kind, details, sync) {
            Ok(record) => {
                self.metrics.audit_records.inc();
                let mut recent = self.trail.recent.locked();
                if recent.len() == RECENT {
                    recent.pop_front();
                }
                recent.push_back(record.clone());
                drop(recent);
                let _ = self.trail.feed.send(record);
                Ok(())
            }
            Err(e) => {
                eprintln!("agentd: audit log: {e:#}");
                Err(e)
            }
        }
    }

    /// [`Daemon::audit`] of an agent, without sync.
    pub fn audit_agent(&self, a: &AgentState, kind: &str, details: Value) {
        let _ = self.audit(&subject(a), kind, details, false);
    }

    /// Who the agent with cgroup id `id` is (or was, if it ended a moment ago).
    pub fn subject_of_id(&self, id: u64) -> Subject {
        if let Some(a) = self.agent_by_id(id) {
            return subject(&a);
        }
        if let Some((s, _)) = self.trail.ended.locked().get(&id) {
            return s.clone();
        }
        Subject {
            agent: Some(format!("cgroup:{id}")),
            ..Subject::default()
        }
    }

    /// Remembers an agent that ends, for its late events.
    pub fn ended(&self, a: &AgentState) {
        let now = Instant::now();
        let mut ended = self.trail.ended.locked();
        ended.retain(|_, (_, t)| now.duration_since(*t) < ENDED_FOR);
        ended.insert(a.id, (subject(a), now));
    }

    /// Counts an allowed event, written later as part of one aggregated record.
    pub fn audit_allowed(&self, a: &AgentState, kind: &str, destination: &str) {
        self.trail
            .aggregator
            .locked()
            .add(&subject(a), kind, destination);
    }

    /// Says in the log when the kernel dropped records (the ring buffer was full): what is
    /// missing is then known to be missing.
    pub fn note_lost(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let Ok(total) = crate::events::lost(&self.kernel.locked()) else {
            return;
        };
        let seen = self.trail.lost_seen.swap(total, Relaxed);
        if total > seen {
            let _ = self.audit(
                &Subject::daemon(),
                "events_lost",
                serde_json::json!({"lost": total - seen, "total": total}),
                false,
            );
        }
    }

    /// Writes the aggregated records of the interval, if it is over (or `force`).
    pub fn flush_aggregated(&self, force: bool) {
        let now = Instant::now();
        let records = {
            let mut agg = self.trail.aggregator.locked();
            if !force && !agg.due(now) {
                return;
            }
            agg.drain(now)
        };
        for (subject, kind, details) in records {
            let _ = self.audit(&subject, &kind, details, false);
        }
    }
}
