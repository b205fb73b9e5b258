//! The egress allowlist through the daemon: TCP and UDP, IPv4-mapped IPv6, loopback, raw
//! and packet sockets, DNS names that resolve only when allowed, and policy changes for a
//! running agent. Listeners and the fake upstream DNS server are on loopback addresses the
//! tests create; no packet is meant to leave the host.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Child, ChildStdout, Stdio},
    time::{Duration, Instant},
};

use agentd_tests::{DaemonSetup, FakeDns, TestDaemon, act_bin, last_json};
use serde_json::Value;

fn act() -> String {
    act_bin!().display().to_string()
}

fn tcp(addr: &str) -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind(addr).unwrap();
    l.set_nonblocking(true).unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn udp(addr: &str) -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let a = s.local_addr().unwrap();
    (s, a)
}

/// Every connection waiting on `l`, with what each sent (until EOF or a short timeout).
fn accept_all(l: &TcpListener) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        match l.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                got.push(buf);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return got,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn datagrams(s: &UdpSocket) -> usize {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while s.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    n
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_allowlist_decides_tcp_udp_mapped_and_loopback() {
    let (allowed, allowed_addr) = tcp("127.0.0.1:0");
    let (denied, denied_addr) = tcp("127.0.0.1:0");
    let (udp_allowed, udp_allowed_addr) = udp("127.0.0.1:0");
    let (udp_denied, udp_denied_addr) = udp("127.0.0.1:0");
    let v6 = TcpListener::bind("[::1]:0").unwrap();
    v6.set_nonblocking(true).unwrap();
    let v6_addr = v6.local_addr().unwrap();
    let profile = format!(
        "name = \"egress\"\nversion = \"1.0.0\"\n[network]\nallow = [\"127.0.0.1:{}/tcp\", \"127.0.0.1:{}/udp\"]\n[files]\ndefault = \"allow\"\n",
        allowed_addr.port(),
        udp_allowed_addr.port()
    );
    let d = TestDaemon::start(&[("egress", &profile)]);
    let act = act();
    let run = |args: &[&str]| {
        let mut v = vec![
            "--profile",
            "egress",
            "--name",
            "egress",
            "--",
            act.as_str(),
        ];
        v.extend_from_slice(args);
        let out = d.run(&v);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        last_json(&out)
    };

    assert_eq!(run(&["connect", &allowed_addr.to_string()])["ok"], true);
    assert_eq!(
        accept_all(&allowed),
        vec!["agentd-act"],
        "data flows on the allowed connection"
    );

    assert_eq!(
        run(&["connect", &denied_addr.to_string()])["errno"],
        libc::EPERM
    );
    assert!(
        accept_all(&denied).is_empty(),
        "the listener of a denied connect sees nothing"
    );

    assert_eq!(
        run(&["udp-send", &udp_denied_addr.to_string()])["errno"],
        libc::EPERM
    );
    assert_eq!(
        datagrams(&udp_denied),
        0,
        "a denied datagram does not arrive"
    );
    assert_eq!(
        run(&["udp-send", &udp_allowed_addr.to_string()])["ok"],
        true
    );
    assert_eq!(datagrams(&udp_allowed), 1);

    let mapped = |a: SocketAddr| format!("[::ffff:{}]:{}", a.ip(), a.port());
    assert_eq!(
        run(&["connect", &mapped(denied_addr)])["errno"],
        libc::EPERM,
        "the denied IPv4 address through ::ffff:"
    );
    assert!(accept_all(&denied).is_empty());
    assert_eq!(
        run(&["connect", &mapped(allowed_addr)])["ok"],
        true,
        "the allowed IPv4 address through ::ffff:"
    );
    assert_eq!(accept_all(&allowed).len(), 1);
    assert_eq!(
        run(&["connect", &v6_addr.to_string()])["errno"],
        libc::EPERM,
        "loopback (::1) is denied by default"
    );

    // A process outside the agent reaches the denied address.
    let out = std::process::Command::new(&act)
        .args(["connect", &denied_addr.to_string()])
        .output()
        .unwrap();
    assert_eq!(last_json(&out)["ok"], true);
    assert_eq!(accept_all(&denied).len(), 1);
    // Each refusal is on record: the denied connect (also through ::ffff:, judged as
    // IPv4), the datagram, and ::1.
    let texts = |d: &TestDaemon| -> Vec<String> {
        d.audit_records()
            .iter()
            .filter(|r| r["agent"] == "egress" && r["kind"] == "net_denied")
            .filter_map(|r| r["details"]["text"].as_str().map(str::to_string))
            .collect()
    };
    for (what, n) in [
        (format!("connect {denied_addr}/tcp denied"), 2),
        (format!("{udp_denied_addr}/udp denied"), 1),
        (format!("connect [::1]:{}/tcp denied", v6_addr.port()), 1),
    ] {
        assert!(
            agentd_tests::wait_until(Duration::from_secs(5), || texts(&d)
                .iter()
                .filter(|t| t.contains(&what))
                .count()
                >= n),
            "{n} record(s) of `{what}`: {:?}",
            texts(&d)
        );
    }
}

#[test]
fn raw_packet_and_other_sockets_are_refused_even_with_capabilities() {
    // (family, type, protocol, expected inside the agent)
    const AF_INET: i32 = 2;
    const AF_INET6: i32 = 10;
    const AF_NETLINK: i32 = 16;
    const AF_PACKET: i32 = 17;
    const AF_VSOCK: i32 = 40;
    const AF_UNIX: i32 = 1;
    #[derive(PartialEq)]
    enum Expect {
        Created,
        /// Refused by agentd (EPERM), where outside the agent it is not refused with EPERM.
        Refused,
        /// Refused, by agentd or by the kernel before agentd's hook runs. Ping sockets: on
        /// hosts whose net.ipv4.ping_group_range excludes the agent's group (the build
        /// host's default), the kernel answers EACCES first.
        Fails,
    }
    use Expect::*;
    let cases: &[(&str, [i32; 3], Expect)] = &[
        (
            "raw IPv4",
            [AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP],
            Refused,
        ),
        (
            "raw IPv6",
            [AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6],
            Refused,
        ),
        (
            "ping socket",
            [AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP],
            Fails,
        ),
        ("packet", [AF_PACKET, libc::SOCK_RAW, 0x0300], Refused),
        ("vsock", [AF_VSOCK, libc::SOCK_STREAM, 0], Refused),
        ("netlink audit", [AF_NETLINK, libc::SOCK_RAW, 9], Refused),
        ("netlink route", [AF_NETLINK, libc::SOCK_RAW, 0], Created),
        ("unix", [AF_UNIX, libc::SOCK_STREAM, 0], Created),
        ("tcp", [AF_INET, libc::SOCK_STREAM, 0], Created),
        ("udp6", [AF_INET6, libc::SOCK_DGRAM, 0], Created),
    ];
    let allcaps = "name = \"allcaps\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n[process]\ncapabilities = [\"ALL\"]\n";
    let d = TestDaemon::start(&[("allcaps", allcaps)]);
    let act = act();
    for (what, [f, t, p], expect) in cases {
        let args = [f.to_string(), t.to_string(), p.to_string()];
        // As root with CAP_NET_RAW, outside any agent, these do not fail with EPERM (raw and
        // packet sockets are created): only agentd can be the cause inside.
        let outside = last_json(
            &std::process::Command::new(&act)
                .arg("socket")
                .args(&args)
                .output()
                .unwrap(),
        );
        let inside = last_json(&d.run(&[
            "--profile",
            "allcaps",
            "--user",
            "root",
            "--degraded-ok",
            "--",
            &act,
            "socket",
            &args[0],
            &args[1],
            &args[2],
        ]));
        match expect {
            Created => assert_eq!(inside["ok"], true, "{what}: {inside}"),
            Refused => {
                assert_ne!(
                    outside["errno"],
                    libc::EPERM,
                    "{what} outside an agent (as root) must not fail with EPERM: {outside}"
                );
                assert_eq!(
                    inside["errno"],
                    libc::EPERM,
                    "{what} inside the agent: {inside}"
                );
            }
            Fails => assert_eq!(inside["ok"], false, "{what} inside the agent: {inside}"),
        }
    }
    // Each refusal by agentd is on record: raw sockets by the `sock_create` hook, the
    // families the seccomp filter refuses as a refused `socket` call.
    let kinds = |kind: &str| {
        d.audit_records()
            .iter()
            .filter(|r| r["kind"] == kind)
            .count()
    };
    assert!(
        agentd_tests::wait_until(Duration::from_secs(5), || kinds("net_denied") >= 2
            && kinds("syscall_denied") >= 3),
        "records: {} net_denied (raw IPv4, raw IPv6), {} syscall_denied (packet, vsock, netlink audit)",
        kinds("net_denied"),
        kinds("syscall_denied")
    );
}

fn resolv_profile(port: u16) -> String {
    format!(
        "name = \"dns\"\nversion = \"1.0.0\"\n[network]\nhosts = [\"allowed.test:{port}/tcp\", \"*.wild.test:{port}/tcp\"]\n[files]\ndefault = \"allow\"\n"
    )
}

#[test]
fn names_resolve_only_when_allowed_and_denied_names_never_leave() {
    // The answer is an address of its own on loopback, reachable only once resolved.
    let (target, target_addr) = tcp("127.0.0.77:0");
    let upstream = FakeDns::start(&[
        ("allowed.test", Ipv4Addr::new(127, 0, 0, 77)),
        ("a.wild.test", Ipv4Addr::new(127, 0, 0, 77)),
        ("secret-data.evil.test", Ipv4Addr::new(127, 0, 0, 66)),
    ]);
    let profile = resolv_profile(target_addr.port());
    let config = format!("[dns]\nupstream = [\"{}\"]\n", upstream.addr);
    // Agents see a resolv.conf of the test's own: a loopback nameserver, so nothing would
    // leave the host even if the redirection failed.
    let d = TestDaemon::with(DaemonSetup {
        profiles: &[("dns", &profile)],
        extra_config: &config,
        resolv_conf: Some("nameserver 127.0.0.1\n"),
        ..Default::default()
    });
    let act = act();
    let script = format!(
        "{act} connect {t}; getent hosts allowed.test; echo getent-allowed=$?; {act} connect {t}; \
         getent hosts secret-data.evil.test; echo getent-evil=$?; \
         {act} dns a.wild.test 127.0.0.9:53 tcp; {act} dns secret-data.evil.test 127.0.0.9:53 tcp",
        t = target_addr
    );
    let out = d.run(&[
        "--profile",
        "dns",
        "--name",
        "resolver",
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let json = |i: usize| -> Value {
        serde_json::from_str(lines[i])
            .unwrap_or_else(|e| panic!("{e}: line {i} of\n{text}\n{}", stderr(&out)))
    };
    assert_eq!(
        json(0)["errno"],
        libc::EPERM,
        "before resolving, the address is not allowed:\n{text}"
    );
    assert!(
        lines[1].starts_with("127.0.0.77") && lines[1].contains("allowed.test"),
        "getent answered:\n{text}"
    );
    assert_eq!(lines[2], "getent-allowed=0");
    assert_eq!(
        json(3)["ok"],
        true,
        "the answered address is reachable:\n{text}"
    );
    assert_eq!(accept_all(&target), vec!["agentd-act"]);
    assert_eq!(
        lines[4], "getent-evil=2",
        "a name the policy does not allow does not resolve:\n{text}"
    );
    assert_eq!(
        json(5)["detail"]["rcode"],
        "NoError",
        "DNS over TCP to an address written into the program:\n{text}"
    );
    assert_eq!(json(5)["detail"]["addresses"][0], "127.0.0.77");
    assert_eq!(json(6)["detail"]["rcode"], "Refused", "{text}");
    let asked = upstream.asked();
    assert!(
        asked.contains(&"allowed.test".to_string()),
        "the allowed name was forwarded: {asked:?}"
    );
    assert!(
        !asked.iter().any(|n| n.contains("evil")),
        "a denied name reached the upstream resolver: {asked:?}"
    );
}

/// A running `agentd run` whose stdout is read line by line.
struct Running {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Running {
    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn update(d: &TestDaemon, args: &[&str]) {
    let out = d.agentd().arg("update").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "agentd update {args:?}: {}",
        stderr(&out)
    );
}

#[test]
fn a_policy_change_takes_effect_for_a_running_agent() {
    let (target, target_addr) = tcp("127.0.0.1:0");
    let closed = "name = \"closed\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n";
    let d = TestDaemon::start(&[("closed", closed)]);
    let act = act();
    let mut child = d
        .agentd()
        .args([
            "run",
            "--profile",
            "closed",
            "--name",
            "loop",
            "--",
            &act,
            "connect-loop",
            &target_addr.to_string(),
            "200",
            "50",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut running = Running {
        child,
        out: BufReader::new(out),
    };
    assert_eq!(running.line()["errno"], libc::EPERM, "denied at first");
    update(&d, &["loop", "--allow-net", &format!("{target_addr}/tcp")]);
    let started = Instant::now();
    let mut last = running.line();
    while last["ok"] != true && started.elapsed() < Duration::from_secs(10) {
        last = running.line();
    }
    assert_eq!(last["ok"], true, "allowed after the update");
    assert_eq!(running.child.wait().unwrap().code(), Some(0));
    assert_eq!(accept_all(&target), vec!["agentd-act"]);
}

#[test]
fn a_connection_made_before_a_policy_tightens_cannot_carry_more_data() {
    let (target, target_addr) = tcp("127.0.0.1:0");
    let open = format!(
        "name = \"open\"\nversion = \"1.0.0\"\n[network]\nallow = [\"{target_addr}/tcp\"]\n[files]\ndefault = \"allow\"\n"
    );
    let closed = "name = \"closed\"\nversion = \"2.0.0\"\n[files]\ndefault = \"allow\"\n";
    let d = TestDaemon::start(&[("open", &open), ("closed", closed)]);
    let act = act();
    let mut child = d
        .agentd()
        .args([
            "run",
            "--profile",
            "open",
            "--name",
            "holder",
            "--",
            &act,
            "hold",
            &target_addr.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let out = child.stdout.take().unwrap();
    let mut running = Running {
        child,
        out: BufReader::new(out),
    };
    assert_eq!(
        running.line()["ok"],
        true,
        "connected and sent the first line"
    );
    // Take the accepted connection and read the first line.
    let mut conn: TcpStream = loop {
        match target.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut first = [0u8; 6];
    conn.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"first\n");

    update(&d, &["holder", "--profile", "closed"]);
    writeln!(stdin, "second").unwrap();
    assert_eq!(
        running.line()["ok"],
        true,
        "the agent's send() was accepted by its own socket"
    );
    let mut more = [0u8; 16];
    conn.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    match conn.read(&mut more) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!(
            "data crossed after the policy tightened: {other:?} {:?}",
            String::from_utf8_lossy(&more)
        ),
    }
    let inspect: Value = serde_json::from_slice(
        &d.agentd()
            .args(["inspect", "holder", "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(inspect["policy"]["profile"], "closed");
    assert!(
        inspect["counters"]["net_denied"].as_u64().unwrap() >= 1,
        "the dropped packets were reported: {}",
        inspect["counters"]
    );
}

/// An agent cannot bind agentd's resolver addresses (127.53.0.0/16) or its metrics port
/// (EPERM from `bind4`/`bind6`, with an event), while other binds work and processes
/// outside agents are not concerned.
#[test]
fn an_agent_cannot_bind_agentds_resolver_addresses_or_metrics_port() {
    let d = TestDaemon::start(&[(
        "plain",
        "name = \"plain\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n",
    )]);
    let metrics = d.metrics_addr();
    let act = act();
    let script = format!(
        "{act} bind 127.53.200.1:10053 udp; {act} bind 127.53.0.9:4000 tcp; \
         {act} bind 127.0.0.1:{p} tcp; {act} bind [::1]:{p} tcp; {act} bind 127.0.0.1:0 tcp",
        p = metrics.port()
    );
    let out = d.run(&[
        "--profile",
        "plain",
        "--name",
        "binder",
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{text}");
    for v in &lines[..4] {
        assert_eq!(
            (&v["ok"], &v["errno"]),
            (&Value::Bool(false), &Value::from(libc::EPERM)),
            "{text}"
        );
    }
    assert_eq!(lines[4]["ok"], true, "another bind works: {text}");
    // Outside agents: the resolver range is free to bind (the port is not the daemon's).
    let outside = std::net::UdpSocket::bind("127.53.200.1:0");
    assert!(outside.is_ok(), "{outside:?}");
    assert!(
        agentd_tests::wait_until(std::time::Duration::from_secs(5), || {
            d.audit_records()
                .iter()
                .filter(|r| {
                    r["agent"] == "binder"
                        && r["kind"] == "net_denied"
                        && r["details"]["text"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("bind "))
                })
                .count()
                == 4
        }),
        "each refused bind is recorded"
    );
}
