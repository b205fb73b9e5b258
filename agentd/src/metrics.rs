//! Prometheus metrics, served on `metrics.listen` (default 127.0.0.1:9464) at /metrics.
//!
//! Label values come from small fixed sets (kinds, verdicts, actions, enforcement areas),
//! never from agent names, profiles or destinations: thousands of short-lived agents add
//! no series. Per-agent detail is in the audit log and `agentd inspect`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{Request, Response, body::Bytes};
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric agentd exports.
pub struct Metrics {
    pub registry: Registry,
    /// `agentd_agents_running`
    pub agents_running: IntGauge,
    /// `agentd_agents_started_total`
    pub agents_started: IntCounter,
    /// `agentd_decisions_total{kind, verdict}`: kind net|file|process|budget, verdict
    /// deny|would_deny.
    pub decisions: IntCounterVec,
    /// `agentd_budget_exhaustions_total{action}`: log|throttle|kill|deny.
    pub budget_exhaustions: IntCounterVec,
    /// `agentd_kill_switch_total{action}`: kill|freeze|thaw, per agent acted on.
    pub kills: IntCounterVec,
    /// `agentd_kill_duration_seconds`: from the kill switch to an empty cgroup.
    pub kill_duration: Histogram,
    /// `agentd_dns_answers_total` and `agentd_dns_refusals_total`.
    pub dns_answers: IntCounter,
    pub dns_refusals: IntCounter,
    /// `agentd_events_lost_total`: kernel records dropped because the ring buffer was full
    /// (read from the kernel's counter).
    pub events_lost: IntGauge,
    /// `agentd_enforcer_active{area, enforcer}`: 1 for each enforcer in use.
    pub enforcers: IntGaugeVec,
    /// `agentd_policy_updates_total`: policy changes of running agents.
    pub policy_updates: IntCounter,
    /// `agentd_audit_records_total`
    pub audit_records: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Metrics> {
        let registry = Registry::new();
        let m = Metrics {
            agents_running: IntGauge::new("agentd_agents_running", "Agents running now")?,
            agents_started: IntCounter::new(
                "agentd_agents_started_total",
                "Agents started (and adopted) since the daemon started",
            )?,
            decisions: IntCounterVec::new(
                Opts::new(
                    "agentd_decisions_total",
                    "Decisions the kernel reported, by kind (net, file, process, budget) and verdict (deny, would_deny)",
                ),
                &["kind", "verdict"],
            )?,
            budget_exhaustions: IntCounterVec::new(
                Opts::new(
                    "agentd_budget_exhaustions_total",
                    "Rate budgets found empty, by the budget's action",
                ),
                &["action"],
            )?,
            kills: IntCounterVec::new(
                Opts::new(
                    "agentd_kill_switch_total",
                    "Agents acted on by the kill switch, by action (kill, freeze, thaw)",
                ),
                &["action"],
            )?,
            kill_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "agentd_kill_duration_seconds",
                    "From the kill switch to an empty agent cgroup",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
                ]),
            )?,
            dns_answers: IntCounter::new(
                "agentd_dns_answers_total",
                "DNS queries of agents answered (allowed names)",
            )?,
            dns_refusals: IntCounter::new(
                "agentd_dns_refusals_total",
                "DNS queries of agents refused (names not allowed)",
            )?,
            events_lost: IntGauge::new(
                "agentd_events_lost_total",
                "Kernel event records dropped because the ring buffer was full",
            )?,
            enforcers: IntGaugeVec::new(
                Opts::new(
                    "agentd_enforcer_active",
                    "1 for each enforcer in use, by area and enforcer",
                ),
                &["area", "enforcer"],
            )?,
            policy_updates: IntCounter::new(
                "agentd_policy_updates_total",
                "Policy changes of running agents",
            )?,
            audit_records: IntCounter::new(
                "agentd_audit_records_total",
                "Records written to the audit log",
            )?,
            registry,
        };
        m.registry.register(Box::new(m.agents_running.clone()))?;
        m.registry.register(Box::new(m.agents_started.clone()))?;
        m.registry.register(Box::new(m.decisions.clone()))?;
        m.registry
            .register(Box::new(m.budget_exhaustions.clone()))?;
        m.registry.register(Box::new(m.kills.clone()))?;
        m.registry.register(Box::new(m.kill_duration.clone()))?;
        m.registry.register(Box::new(m.dns_answers.clone()))?;
        m.registry.register(Box::new(m.dns_refusals.clone()))?;
        m.registry.register(Box::new(m.events_lost.clone()))?;
        m.registry.register(Box::new(m.enforcers.clone()))?;
        m.registry.register(Box::new(m.policy_updates.clone()))?;
        m.registry.register(Box::new(m.audit_records.clone()))?;
        // Series that exist from the start, so a scrape shows zeros rather than nothing.
        for kind in ["net", "file", "process", "budget"] {
            for verdict in ["deny", "would_deny"] {
                m.decisions.with_label_values(&[kind, verdict]);
            }
        }
        for action in ["kill", "freeze", "thaw"] {
            m.kills.with_label_values(&[action]);
        }
        Ok(m)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Most scrapes served at once; more connections wait in the listen queue.
const MAX_CONNECTIONS: usize = 16;
/// A connection may take this long to send its request and this long in all.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `GET /metrics` on `listener` until the task is dropped; `refresh` runs before
/// each scrape (for values read from the kernel). Any local process can connect, so the
/// daemon's descriptors and time are bounded: a few connections at once, each with a
/// deadline.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors or similar: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, refresh) = (metrics.clone(), refresh.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, refresh) = (metrics.clone(), refresh.clone());
                async move {
                    let response = if req.uri().path() == "/metrics" {
                        refresh();
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(metrics.render())))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(
                                b"agentd: only /metrics is here\n",
                            )))
                    };
                    Ok::<_, Infallible>(response.expect("a static response builds"))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

/// Binds the listener (an error names the configuration key).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics.listen {addr}: cannot listen"))
}
