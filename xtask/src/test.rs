//! `cargo xtask test`: every test stage, one closing `N passed, N failed` line.
//!
//! Stages:
//! - unit: `cargo test` of the libraries and binaries; needs no root.
//! - host: `tests/host`, as root, against the running kernel.
//! - demo: `cargo xtask demo` (with the agentd the host stage built), then a look for any
//!   cgroup, pin directory, temporary directory or process it left behind; one test.
//! - vm: `tests/vm` inside each VM kernel that `cargo xtask setup` installed (BPF LSM).
//!
//! A stage that cannot run (not root, no kernel, a build failure, a VM that does not report
//! back) counts as one failure with its reason; nothing is skipped silently.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};

use crate::{
    util::{Timer, is_root, show, workspace_root},
    vm,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    Unit,
    Host,
    Demo,
    Vm,
}

#[derive(clap::Args)]
pub struct Options {
    /// Run only these stages (repeatable). Default: unit, host, demo, vm.
    #[arg(long, value_enum)]
    stage: Vec<Stage>,
    /// VM kernel series to boot (repeatable), e.g. 6.1. Default: every installed one.
    #[arg(long)]
    kernel: Vec<String>,
    /// Only tests whose name contains this text.
    filter: Option<String>,
}

/// Counts parsed from libtest's `test result:` lines.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
    /// `test result:` lines seen (one per test binary).
    pub binaries: u32,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.binaries += other.binaries;
    }

    /// Parses one output line; returns true if it was a `test result:` line.
    pub fn parse_line(&mut self, line: &str) -> bool {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return false;
        };
        let number = |label: &str| -> u32 {
            rest.split(';')
                .find_map(|part| part.trim().strip_suffix(label))
                .and_then(|n| n.trim().rsplit(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        self.passed += number("passed");
        self.failed += number("failed");
        self.ignored += number("ignored");
        self.binaries += 1;
        true
    }
}

/// One stage's outcome.
pub struct StageResult {
    pub name: String,
    pub counts: Counts,
    /// Why the stage could not run or report, if it did not.
    pub problem: Option<String>,
    /// Why its test failed, for a stage that is one test (counted in `counts.failed`).
    pub failure: Option<String>,
    pub secs: f64,
}

impl StageResult {
    fn summary(&self) -> String {
        let c = &self.counts;
        let mut s = format!(
            "stage {:<10} {} passed, {} failed, {} ignored ({:.0} s)",
            self.name, c.passed, c.failed, c.ignored, self.secs
        );
        if let Some(p) = &self.problem {
            s.push_str(&format!(" -- FAILED TO RUN: {p}"));
        }
        if let Some(f) = &self.failure {
            s.push_str(&format!(" -- FAILED: {f}"));
        }
        s
    }
}

/// Runs a command, echoing its stdout and counting test results; returns the counts and
/// whether it exited successfully.
pub fn run_counting(cmd: &mut Command, prefix: &str) -> Result<(Counts, bool)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    let stdout = child.stdout.take().expect("piped");
    let mut counts = Counts::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        counts.parse_line(&line);
        println!("{prefix}{line}");
    }
    let status = child.wait()?;
    Ok((counts, status.success()))
}

fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

fn filter_args(filter: &Option<String>) -> Vec<String> {
    filter.iter().cloned().collect()
}

fn unit(opts: &Options) -> StageResult {
    let timer = Timer::start();
    let mut cmd = cargo();
    // Every cargo command of the test stages selects the workspace's default members, so
    // features resolve the same way and agentd's build script (which builds the eBPF
    // object) runs once.
    cmd.args(["test", "--lib", "--bins", "--"]);
    cmd.args(filter_args(&opts.filter));
    finish("unit", timer, run_counting(&mut cmd, ""))
}

fn host(opts: &Options) -> StageResult {
    let timer = Timer::start();
    if !is_root() {
        return StageResult {
            name: "host".into(),
            counts: Counts::default(),
            problem: Some(
                "the host stage loads BPF programs and creates cgroups: run it as root".into(),
            ),
            failure: None,
            secs: 0.0,
        };
    }
    if !build_bins() {
        return finish(
            "host",
            timer,
            Err(anyhow!("building agentd and agentd-act failed")),
        );
    }
    let mut cmd = cargo();
    cmd.env("AGENTD_BIN", workspace_root().join("target/debug/agentd"));
    // One test at a time: tests count the kernel's programs and cgroups.
    cmd.args(["test", "--test", "host", "--", "--test-threads=1"]);
    cmd.args(filter_args(&opts.filter));
    finish("host", timer, run_counting(&mut cmd, ""))
}

/// The debug binaries (agentd, agentd-act) the host and demo stages use.
fn build_bins() -> bool {
    let built = Command::new("cargo")
        .current_dir(workspace_root())
        .args(["build", "--bins"])
        .status();
    matches!(built, Ok(s) if s.success())
}

/// How long the demo may take (it takes seconds) before it is interrupted (SIGINT, so that
/// its guard cleans up), and then killed.
const DEMO_TIMEOUT: Duration = Duration::from_secs(300);
const DEMO_GRACE: Duration = Duration::from_secs(60);

/// `xtask demo --agentd target/debug/agentd` (the binary the host stage built: the release
/// build of `cargo xtask demo` would add minutes, and setup is the test command's premise),
/// then the check that it left nothing behind: no `<cgroup2>/agentd-demo-*` cgroup, no
/// `/sys/fs/bpf/agentd-demo-*` directory, no `$TMPDIR/agentd-demo-*` directory, no process
/// whose command line, environment or cgroup names one, that was not there before. One
/// test: it passes if the demo succeeded and nothing is left.
fn demo(opts: &Options) -> StageResult {
    let timer = Timer::start();
    let mut result = StageResult {
        name: "demo".into(),
        counts: Counts {
            binaries: 1,
            ..Default::default()
        },
        problem: None,
        failure: None,
        secs: 0.0,
    };
    if opts
        .filter
        .as_ref()
        .is_some_and(|f| !"demo".contains(f.as_str()))
    {
        println!("test demo ... filtered out");
        return result;
    }
    if !is_root() {
        result.problem = Some(
            "the demo runs agentd's daemon, which loads BPF programs and creates cgroups: run it as root"
                .into(),
        );
        return result;
    }
    if !build_bins() {
        result.problem = Some("building agentd failed".into());
        return result;
    }
    let before = crate::demo::leftovers(crate::demo::NAME_PREFIX, true);
    let failure = run_demo().err().map(|e| format!("{e:#}"));
    // The demo waits for its own leftovers to go; anything still there now stays.
    let left: Vec<String> = crate::demo::leftovers(crate::demo::NAME_PREFIX, true)
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect();
    let mut reasons: Vec<String> = failure.into_iter().collect();
    if !left.is_empty() {
        reasons.extend(left);
    }
    if reasons.is_empty() {
        println!("test demo ... ok");
        result.counts.passed = 1;
    } else {
        println!("test demo ... FAILED");
        result.counts.failed = 1;
        result.failure = Some(reasons.join("; "));
    }
    result.secs = timer.secs();
    result
}

/// Runs the demo, its output prefixed with `[demo] `; fails with its error line if it
/// fails.
fn run_demo() -> Result<()> {
    // This very binary: `cargo build --bins` may just have replaced the file it was
    // started from (the workspace's features differ from xtask's alone), and
    // /proc/self/exe still reaches the one running.
    let mut child = Command::new("/proc/self/exe")
        .arg("demo")
        .arg("--agentd")
        .arg(workspace_root().join("target/debug/agentd"))
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `xtask demo`")?;
    // Each stream's lines, echoed as they come and sent whole at its end.
    let echo = |stream: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stream).lines() {
                let line = line.unwrap_or_default();
                println!("[demo] {line}");
                lines.push(line);
            }
            let _ = tx.send(lines);
        });
        rx
    };
    let out = echo(Box::new(child.stdout.take().expect("piped")));
    let err = echo(Box::new(child.stderr.take().expect("piped")));
    let start = Instant::now();
    let mut interrupted = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let waited = start.elapsed();
        if waited > DEMO_TIMEOUT && !interrupted {
            // SAFETY: signals our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            interrupted = true;
        } else if waited > DEMO_TIMEOUT + DEMO_GRACE {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Its output ends with it, unless a process it left holds the pipes open: then the
    // caller finds that process (not waiting for it to end).
    let held = "a process the demo started still holds its output open";
    out.recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!(held))?;
    let err = err
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!(held))?;
    // Its error: from `xtask: error:` on (the failed steps follow it, one a line).
    let from = err
        .iter()
        .rposition(|l| l.starts_with("xtask: error:"))
        .unwrap_or(err.len().saturating_sub(1));
    let mut lines = err[from.min(err.len())..].iter().map(|l| l.trim());
    let first = lines.next().unwrap_or_default();
    let error = format!("{first} {}", lines.collect::<Vec<_>>().join("; "));
    if interrupted {
        anyhow::bail!("the demo did not finish within {DEMO_TIMEOUT:?} and was interrupted");
    }
    if !status.success() {
        anyhow::bail!("the demo failed ({status}): {error}");
    }
    Ok(())
}

fn finish(name: &str, timer: Timer, outcome: Result<(Counts, bool)>) -> StageResult {
    let (counts, problem) = match outcome {
        Ok((counts, ok)) => {
            let problem = if counts.binaries == 0 {
                Some("no test binary reported results".to_string())
            } else if !ok && counts.failed == 0 {
                Some("the test command failed before or after running the tests".to_string())
            } else {
                None
            };
            (counts, problem)
        }
        Err(e) => (Counts::default(), Some(format!("{e:#}"))),
    };
    StageResult {
        name: name.into(),
        counts,
        problem,
        failure: None,
        secs: timer.secs(),
    }
}

pub fn run(opts: Options) -> Result<()> {
    let stages = if opts.stage.is_empty() {
        vec![Stage::Unit, Stage::Host, Stage::Demo, Stage::Vm]
    } else {
        opts.stage.clone()
    };
    let mut results = Vec::new();
    for stage in &stages {
        println!("==> stage {stage:?}");
        let new = match stage {
            Stage::Unit => vec![unit(&opts)],
            Stage::Host => vec![host(&opts)],
            Stage::Demo => vec![demo(&opts)],
            Stage::Vm => vm_stage(&opts),
        };
        for r in &new {
            println!("==> {}", r.summary());
        }
        results.extend(new);
    }
    println!("\nSummary:");
    let mut total = Counts::default();
    let mut broken = 0;
    for r in &results {
        println!("  {}", r.summary());
        total.add(r.counts);
        if r.problem.is_some() {
            broken += 1;
        }
    }
    let failed = total.failed + broken;
    if total.ignored > 0 {
        println!(
            "{} passed, {} failed, {} skipped",
            total.passed, failed, total.ignored
        );
    } else {
        println!("{} passed, {} failed", total.passed, failed);
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

fn vm_stage(opts: &Options) -> Vec<StageResult> {
    let timer = Timer::start();
    let kernels: Vec<String> = if opts.kernel.is_empty() {
        crate::setup::VM_KERNELS
            .iter()
            .map(|k| k.series.to_string())
            .collect()
    } else {
        opts.kernel.clone()
    };
    let image = match vm::build_initramfs(opts.filter.as_deref(), false) {
        Ok(image) => image,
        Err(e) => return vec![finish("vm", timer, Err(e))],
    };
    kernels
        .iter()
        .map(|series| run_vm(series, &image))
        .collect()
}

fn run_vm(series: &str, image: &Path) -> StageResult {
    let timer = Timer::start();
    let name = format!("vm {series}");
    let outcome = vm::boot(series, image, &format!("[vm {series}] ")).map(|report| {
        let ok = report.exit_code == Some(0);
        (report.counts, ok)
    });
    finish(&name, timer, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_result_lines() {
        let mut c = Counts::default();
        assert!(c.parse_line("test result: ok. 15 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.08s"));
        assert!(c.parse_line("\rtest result: FAILED. 1 passed; 3 failed; 0 ignored; 0 measured; 2 filtered out; finished in 2.45s\r"));
        assert!(!c.parse_line("test network::x ... ok"));
        assert_eq!(
            c,
            Counts {
                passed: 16,
                failed: 3,
                ignored: 2,
                binaries: 2
            }
        );
    }

    #[test]
    fn a_stage_that_reports_nothing_is_a_failure() {
        let r = finish("x", Timer::start(), Ok((Counts::default(), true)));
        assert!(r.problem.unwrap().contains("no test binary"));
        let r = finish(
            "x",
            Timer::start(),
            Ok((
                Counts {
                    passed: 3,
                    binaries: 1,
                    ..Default::default()
                },
                false,
            )),
        );
        assert!(
            r.problem.is_some(),
            "non-zero exit with no failed test is a failure"
        );
    }
}
