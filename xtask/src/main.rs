//! Developer tasks for agentd. Run as `cargo xtask <task>`.
//!
//! - `setup`: install what the build and the tests need on a fresh machine (idempotent).
//! - `build`: the eBPF object and the userspace binary, release.
//! - `test`: unit tests, host integration tests (root), VM tests (BPF LSM kernels).
//! - `vm`: boot a test kernel with the current binaries, for tests or an interactive look.
//! - `daemon`: build and run the daemon in the foreground with this checkout's profiles.
//! - `demo`: what agentd does, in a short story on a fresh machine (setup, build, a daemon
//!   of its own, two agents), leaving nothing behind.
//! - `bench`: measure agentd's overhead and kill switch latency; writes bench/RESULTS.md
//!   and bench/results.json (as root; not part of `test`).

mod bench;
mod build;
mod daemon;
mod demo;
mod host;
mod setup;
mod test;
mod util;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer tasks for agentd")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing to build and test agentd (Debian packages, nightly rust-src,
    /// bpf-linker, VM kernels). Safe to run again: present pieces are reported and skipped.
    Setup(setup::Options),
    /// Build the eBPF object and the agentd binary (release); prints the binary's path.
    Build(build::Options),
    /// Run every test stage (unit, host, demo, vm) and end with one `N passed, N failed` line.
    ///
    /// Examples:
    ///   cargo xtask test                  # all stages
    ///   cargo xtask test --stage host     # one stage
    ///   cargo xtask test --stage vm --kernel 6.1
    ///   cargo xtask test -- connect       # only tests whose name contains "connect"
    #[command(verbatim_doc_comment)]
    Test(test::Options),
    /// Boot a VM test kernel with the agentd binaries and run the VM test suite in it.
    Vm(vm::Options),
    /// Build agentd and run its daemon in the foreground with this checkout's profiles
    /// (as root). Prints how to start an agent against it.
    Daemon(daemon::Options),
    /// See what agentd does, in a short story (as root; the first command on a fresh machine).
    ///
    /// Sets up and builds what is missing, runs a daemon of its own in a temporary root,
    /// and shows an agent allowed one download, denied a connect and a secret, killed by its
    /// process budget, its audit trail, and the kill switch; then removes everything it
    /// created. Exits non-zero if anything did not behave as it says.
    Demo(demo::Options),
    /// Measure what agentd costs (system calls, connects, opens and launches, outside and
    /// inside agents), how fast its kill switch is, how it holds 1,000 agents and how many
    /// denials a second it logs; writes bench/RESULTS.md and bench/results.json (as root;
    /// takes about 20 minutes, `--quick` about 3). Not part of `test`.
    Bench(bench::Options),
    /// The measured loop of `bench`, run in a process of its own (outside or as an agent).
    #[command(hide = true)]
    BenchLoop(bench::LoopOptions),
    /// Case 4 of `bench` inside the VM the bench boots (its init runs it).
    #[command(hide = true)]
    BenchVm(bench::VmOptions),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.task {
        Task::Setup(opts) => setup::run(opts),
        Task::Build(opts) => build::run(opts),
        Task::Test(opts) => test::run(opts),
        Task::Vm(opts) => vm::run(opts),
        Task::Daemon(opts) => daemon::run(opts),
        Task::Demo(opts) => demo::run(opts),
        Task::Bench(opts) => bench::run(opts),
        Task::BenchLoop(opts) => bench::run_loop(opts),
        Task::BenchVm(opts) => bench::run_vm(opts),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}
