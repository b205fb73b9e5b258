//! agentd-act: performs one operation the way an agent would and reports the outcome as
//! one JSON line on stdout: `{"op":..,"ok":true}` or `{"op":..,"ok":false,"errno":N,
//! "error":".."}`. Exit status 0 when the operation was attempted, 2 on bad usage.
//!
//! Operations:
//!   connect ADDR:PORT        TCP connect, then send "agentd-act"
//!   open PATH read|write     open(2) the file for reading or writing
//!   cgroup                   print the process's cgroup v2 path

use std::{
    fs::OpenOptions,
    io::{Error, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

fn report(op: &str, result: Result<String, Error>) {
    match result {
        Ok(detail) => println!(
            "{{\"op\":\"{op}\",\"ok\":true,\"detail\":{}}}",
            serde_json::Value::String(detail)
        ),
        Err(e) => println!(
            "{{\"op\":\"{op}\",\"ok\":false,\"errno\":{},\"error\":{}}}",
            e.raw_os_error().unwrap_or(-1),
            serde_json::Value::String(e.to_string())
        ),
    }
}

fn usage() -> ! {
    eprintln!("usage: agentd-act connect ADDR:PORT | open PATH read|write | cgroup");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["connect", addr] => {
            let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
            let r = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).and_then(|mut s| {
                s.write_all(b"agentd-act")?;
                Ok(format!("connected to {addr}"))
            });
            report("connect", r);
        }
        ["open", path, mode] => {
            let mut o = OpenOptions::new();
            match *mode {
                "read" => o.read(true),
                "write" => o.write(true),
                _ => usage(),
            };
            report(
                "open",
                o.open(path).map(|_| format!("opened {path} for {mode}")),
            );
        }
        ["cgroup"] => {
            let r = std::fs::read_to_string("/proc/self/cgroup").map(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .unwrap_or_default()
                    .to_string()
            });
            report("cgroup", r);
        }
        _ => usage(),
    }
}
