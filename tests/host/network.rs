//! The egress pipeline end to end: connect4 in the kernel denies an agent, spares everyone
//! else, fails closed for an unregistered cgroup, reports each denial, and is gone after.
//! Shared by the host and VM suites (the VM runs it on its kernels too).

use std::{
    io::{ErrorKind, Read as _},
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use agentd::{
    agent, ebpf,
    events::{Event, EventReader},
    network::{self, Allowlist},
    profile::parse_net_rule,
};
use agentd_common::{agent::AgentEntry, events::VERDICT_DENY};
use agentd_tests::{TestRoot, act_bin, act_in, wait_until};

/// The policy id the test stores its rules under.
const POLICY: u64 = 7;

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
    l.set_nonblocking(true).expect("nonblocking");
    let addr = l.local_addr().expect("local addr");
    (l, addr)
}

/// Accepts every pending connection; returns what each sent.
fn accept_all(l: &TcpListener) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        match l.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).expect("blocking");
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                got.push(buf);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return got,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn net_denials(events: &[Event], agent: u64, port: u16) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Net(n) if n.header.agent == agent && n.port == port && n.header.verdict == VERDICT_DENY))
        .count()
}

#[test]
fn connect4_denies_the_agent_spares_others_and_is_gone_after() {
    let root = TestRoot::new("connect4");
    let agent_cg = root.child("agent");
    let stray_cg = root.child("unregistered");
    let (allowed, allowed_addr) = listener();
    let (denied, denied_addr) = listener();
    let act = act_bin!();

    let mut kernel = ebpf::load(&root.load_config()).expect("load agentd's object");
    agent::register(
        &mut kernel,
        agent_cg.id(),
        AgentEntry {
            policy_id: POLICY,
            ..Default::default()
        },
    )
    .expect("register agent");
    let rule = parse_net_rule(&format!("127.0.0.1:{}/tcp", allowed_addr.port())).unwrap();
    let list = Allowlist::compile(&[rule]).unwrap();
    network::apply(&mut kernel, POLICY, &list).expect("apply allowlist");
    let mut reader = EventReader::take(&mut kernel).expect("events");
    let programs =
        network::attach(&mut kernel, &root.open(), None).expect("attach the egress programs");
    assert_eq!(programs.len(), 12, "{programs:?}");
    assert!(programs.iter().all(|(_, id)| ebpf::program_loaded(*id)));

    // Denied destination: EPERM, and the listener sees nothing.
    act_in(
        &act,
        Some(&agent_cg),
        &["connect", &denied_addr.to_string()],
    )
    .assert_errno(libc::EPERM);
    assert!(
        accept_all(&denied).is_empty(),
        "a denied connect reached the listener"
    );

    // Allowed destination: the connection is made and data flows.
    act_in(
        &act,
        Some(&agent_cg),
        &["connect", &allowed_addr.to_string()],
    )
    .assert_ok();
    assert_eq!(accept_all(&allowed), vec!["agentd-act".to_string()]);

    // A process outside the agent root reaches the denied destination.
    act_in(&act, None, &["connect", &denied_addr.to_string()]).assert_ok();
    assert_eq!(accept_all(&denied).len(), 1);

    // A cgroup below the root with no policy entry is denied even the allowed destination
    // (already at socket creation).
    act_in(
        &act,
        Some(&stray_cg),
        &["connect", &allowed_addr.to_string()],
    )
    .assert_errno(libc::EPERM);
    assert!(accept_all(&allowed).is_empty());

    // Each denial was reported, with the agent and the destination.
    let mut events = Vec::new();
    let complete = wait_until(Duration::from_secs(2), || {
        events.extend(reader.drain());
        net_denials(&events, agent_cg.id(), denied_addr.port()) == 1
            && events
                .iter()
                .any(|e| e.header().agent == stray_cg.id() && e.header().verdict == VERDICT_DENY)
    });
    assert!(
        complete,
        "expected one denial event for each denied connect, got {events:?}"
    );
    let e = events
        .iter()
        .find(|e| e.header().agent == agent_cg.id())
        .unwrap();
    assert!(
        e.to_string()
            .contains(&format!("connect {denied_addr}/tcp denied")),
        "{e}"
    );
    assert_eq!(agentd::events::lost(&kernel).unwrap(), 0);

    // Dropping the object detaches and unloads: the program is gone, connects work again.
    drop(reader);
    drop(kernel);
    assert!(
        wait_until(Duration::from_secs(5), || programs
            .iter()
            .all(|(_, id)| !ebpf::program_loaded(*id))),
        "egress programs still loaded: {programs:?}"
    );
    act_in(
        &act,
        Some(&agent_cg),
        &["connect", &denied_addr.to_string()],
    )
    .assert_ok();
    assert_eq!(accept_all(&denied).len(), 1);
}

#[test]
fn an_agent_in_audit_mode_is_reported_but_not_denied() {
    let root = TestRoot::new("connect4-audit");
    let agent_cg = root.child("agent");
    let (denied, denied_addr) = listener();
    let act = act_bin!();
    let mut kernel = ebpf::load(&root.load_config()).unwrap();
    let entry = AgentEntry {
        flags: agentd_common::agent::AGENT_FLAG_AUDIT,
        policy_id: POLICY,
        ..Default::default()
    };
    agent::register(&mut kernel, agent_cg.id(), entry).unwrap();
    let mut reader = EventReader::take(&mut kernel).unwrap();
    network::attach(&mut kernel, &root.open(), None).unwrap();

    act_in(
        &act,
        Some(&agent_cg),
        &["connect", &denied_addr.to_string()],
    )
    .assert_ok();
    assert_eq!(accept_all(&denied).len(), 1);
    let mut events = Vec::new();
    assert!(
        wait_until(Duration::from_secs(2), || {
            events.extend(reader.drain());
            events
                .iter()
                .any(|e| e.to_string().contains("would be denied (audit)"))
        }),
        "no would-deny event: {events:?}"
    );
}
