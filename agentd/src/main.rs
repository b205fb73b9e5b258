//! The `agentd` command.

use std::{path::PathBuf, process::ExitCode};

use agentd::{
    client::{self, RunArgs},
    config::Config,
    policy::Adjustments,
    profile,
    protocol::EXIT_POLICY,
};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "agentd",
    version,
    about = "Contain AI agents with kernel-enforced policy",
    long_about = "agentd contains AI agents: each runs in its own cgroup under a policy (egress allowlist, \
                  file rules, seccomp, limits) that the kernel enforces. Start the daemon once (agentd daemon, \
                  or the systemd service), then launch agents with agentd run."
)]
struct Cli {
    /// Configuration file [default: $AGENTD_CONFIG, else /etc/agentd/agentd.toml]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (as root; systemd starts it as agentd.service).
    Daemon,
    /// Start a program as a contained agent and wait for it.
    ///
    /// The agent gets its own cgroup, runs as an unprivileged user with no capabilities,
    /// under a seccomp filter and its profile's policy. agentd run forwards SIGINT, SIGTERM
    /// and SIGHUP to it and exits with its status (128+N when killed by signal N). Exit
    /// status 2: the profile or a flag was refused and nothing was started; 125: agentd
    /// itself failed; 126/127: the command could not be run / was not found.
    ///
    /// Examples:
    ///   sudo agentd run -- python3 agent.py
    ///   sudo agentd run --profile coding-agent --workdir ~/src/project -- claude
    ///   sudo agentd run --profile ./my-profile.toml --allow-net 10.0.0.5:8080 -- ./bot
    ///   sudo agentd run --audit --verbose -- ./new-agent     # report, deny nothing
    #[command(verbatim_doc_comment)]
    Run(Box<RunCmd>),
    /// List running agents.
    Ps {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an agent's effective policy, what enforces it, its counters and processes.
    Inspect {
        /// Agent name (see agentd ps).
        agent: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give a running agent a new policy: its profile read again or another one, plus
    /// changes. Egress, DNS names and the audit/enforce mode change at once; agents it
    /// launched are narrowed again; its user, capabilities, seccomp filter, limits and
    /// environment stay as they were at launch.
    ///
    /// Examples:
    ///   sudo agentd update my-agent --allow-net 10.0.0.5:8080
    ///   sudo agentd update my-agent --profile coding-agent
    ///   sudo agentd update my-agent --enforce
    #[command(verbatim_doc_comment)]
    Update(Box<UpdateCmd>),
    /// The kill switch: kill agents (every process, at once), or freeze them for
    /// inspection.
    ///
    /// Asks the daemon, which sets each agent's kill flag in the kernel, writes its
    /// cgroup.kill, waits until it is empty and removes it. If the daemon does not accept
    /// the request within 3 s, or with --direct, acts on the agent cgroups itself (as
    /// root): it needs neither the daemon nor the agents. `systemctl kill -s SIGUSR1
    /// agentd` kills every agent too. Exit status 1 if any agent was not acted on.
    ///
    /// Examples:
    ///   sudo agentd kill my-agent
    ///   sudo agentd kill --all
    ///   sudo agentd kill --freeze my-agent      # then: agentd thaw, or agentd kill
    ///   sudo agentd kill --all --direct --json  # without the daemon
    #[command(verbatim_doc_comment)]
    Kill {
        /// Agent names (see agentd ps).
        #[arg(value_name = "AGENT", required_unless_present = "all")]
        agents: Vec<String>,
        /// Every agent.
        #[arg(long, conflicts_with = "agents")]
        all: bool,
        /// Freeze instead of kill (cgroup.freeze).
        #[arg(long)]
        freeze: bool,
        /// Do not ask the daemon: write the cgroup files directly (root).
        #[arg(long)]
        direct: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let agents frozen by `agentd kill --freeze` run again.
    ///
    /// Examples:
    ///   sudo agentd thaw my-agent
    #[command(verbatim_doc_comment)]
    Thaw {
        /// Agent names (see agentd ps).
        #[arg(value_name = "AGENT", required_unless_present = "all")]
        agents: Vec<String>,
        /// Every agent.
        #[arg(long, conflicts_with = "agents")]
        all: bool,
        /// Do not ask the daemon: write the cgroup files directly (root).
        #[arg(long)]
        direct: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what this host can enforce, found by loading real programs (needs root).
    ///
    /// Exits 0 when agentd can contain agents here, 1 when it cannot.
    ///
    /// Examples:
    ///   sudo agentd doctor
    ///   sudo agentd doctor --json | jq '.checks[] | select(.status != "ok")'
    #[command(verbatim_doc_comment)]
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Install agentd on this host: the binary, the systemd unit, a default configuration,
    /// the shipped profiles, the admin group and the agents' user, the log and run
    /// directories (as root).
    ///
    /// Idempotent: run it again after an upgrade. It never overwrites the configuration or
    /// a profile that exists (an edited one is said to be kept); the binary and the unit are
    /// replaced when they differ. `systemctl daemon-reload` is run if systemd is PID 1.
    /// With --prefix DIR the files go below DIR, which stands for the target's root (as
    /// DESTDIR does): they still name /usr/local/bin/agentd and /etc/agentd, and the
    /// accounts that would be created are printed, not created.
    ///
    /// Examples:
    ///   sudo agentd install && sudo systemctl enable --now agentd
    ///   agentd install --prefix /tmp/agentd-root --json
    #[command(verbatim_doc_comment)]
    Install {
        /// Root of the file system to install into
        #[arg(long, value_name = "DIR", default_value = "/")]
        prefix: PathBuf,
        /// Print what was done as JSON (the progress lines go to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Take agentd off this host: kill every agent first (through the daemon, else on the
    /// agent cgroups directly), stop and disable the service, stop a daemon started by
    /// hand, remove the binary and the unit.
    ///
    /// The configuration, the profiles and the audit log are kept unless --purge; the
    /// accounts are always kept (files agents made stay theirs). If an agent cannot be
    /// killed, nothing is removed. With --prefix DIR other than /, only the files below DIR
    /// are removed, and agents only of the daemon that --config names.
    ///
    /// Examples:
    ///   sudo agentd uninstall
    ///   sudo agentd uninstall --purge --json
    #[command(verbatim_doc_comment)]
    Uninstall {
        /// Root of the file system to uninstall from
        #[arg(long, value_name = "DIR", default_value = "/")]
        prefix: PathBuf,
        /// Also remove the configuration, the profiles and the audit log.
        #[arg(long)]
        purge: bool,
        /// Print what was done as JSON (the progress lines go to stderr).
        #[arg(long)]
        json: bool,
    },
    /// List, show and check policy profiles.
    Profiles {
        #[command(subcommand)]
        command: ProfilesCmd,
    },
    /// Show the audit records: the most recent ones, and with --follow each new one as
    /// it is written (denials, budget exhaustions, kills, agent starts and ends, ...).
    ///
    /// Examples:
    ///   sudo agentd events
    ///   sudo agentd events --follow --agent my-agent
    ///   sudo agentd events --follow --json | jq 'select(.kind == "net_denied")'
    #[command(verbatim_doc_comment)]
    Events {
        /// Keep showing new records until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// Only the records of this agent.
        #[arg(long, value_name = "AGENT")]
        agent: Option<String>,
        /// How many recent records to show first.
        #[arg(long, short = 'n', default_value_t = 20)]
        last: usize,
        /// One JSON record per line (as in the audit log).
        #[arg(long)]
        json: bool,
    },
    /// Turn the kernel programs' debug log on or off (off at start). While on, programs
    /// write a line to the daemon's log at each point where they log (egress denials).
    ///
    /// Examples:
    ///   sudo agentd debug-log on
    ///   sudo agentd debug-log off
    #[command(verbatim_doc_comment)]
    DebugLog {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Read the configuration and every profile again, then move each running agent to
    /// its profile's new version, without restarting it. Same as SIGHUP to the daemon
    /// (`systemctl reload agentd`).
    ///
    /// Everything is checked first: a file that does not parse, a key only a restart can
    /// change, a profile whose rules changed under the same version, or a profile a running
    /// agent uses that is gone refuses the reload (exit 2) and nothing changes. Each agent
    /// that moves is switched in one step (its old or its new rules, never a mix), and the
    /// audit log has its old and new version. A profile with `mode = "audit"` reports what
    /// it would deny and denies nothing: try a new version on live agents, then reload it
    /// with `mode = "enforce"`.
    ///
    /// Examples:
    ///   sudo agentd profiles diff default ./default.toml.new   # what the new version changes
    ///   sudo cp ./default.toml.new /etc/agentd/profiles/default.toml
    ///   sudo agentd reload
    ///   sudo agentd reload --json
    #[command(verbatim_doc_comment)]
    Reload {
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCmd,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Walk the hash chain of the audit log and name the first record that was changed,
    /// removed or reordered. Exit status 0 when the chain holds, 1 when it does not.
    ///
    /// Without FILES: the configured log (audit.path) with its rotated files, oldest
    /// first.
    ///
    /// Examples:
    ///   sudo agentd audit verify
    ///   sudo agentd audit verify /var/log/agentd/audit.jsonl.1 /var/log/agentd/audit.jsonl
    #[command(verbatim_doc_comment)]
    Verify {
        /// Files in chain order (oldest first).
        files: Vec<std::path::PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Rules added on the command line, for `run` and `update`.
#[derive(Args)]
struct RuleFlags {
    /// Also allow connections to CIDR[:PORT[-PORT]][/tcp|/udp] (repeatable)
    #[arg(long = "allow-net", value_name = "CIDR[:PORT]")]
    allow_net: Vec<String>,
    /// Also allow the DNS name NAME[:PORT] (repeatable)
    #[arg(long = "allow-host", value_name = "NAME[:PORT]")]
    allow_host: Vec<String>,
    /// Also allow reading PATH (repeatable)
    #[arg(long = "allow-read", value_name = "PATH")]
    allow_read: Vec<PathBuf>,
    /// Also allow reading and writing PATH (repeatable)
    #[arg(long = "allow-write", value_name = "PATH")]
    allow_write: Vec<PathBuf>,
    /// Deny every access to PATH (repeatable)
    #[arg(long = "deny-path", value_name = "PATH")]
    deny_path: Vec<PathBuf>,
}

impl RuleFlags {
    fn adjustments(self, audit: bool) -> Adjustments {
        Adjustments {
            allow_net: self.allow_net,
            allow_host: self.allow_host,
            allow_read: self.allow_read,
            allow_write: self.allow_write,
            deny_path: self.deny_path,
            audit,
        }
    }
}

#[derive(Args)]
struct RunCmd {
    /// Profile name (in the profiles directory) or path to a profile file [default: default]
    #[arg(long, value_name = "NAME|PATH")]
    profile: Option<String>,
    /// Agent name [default: agent-<random>]
    #[arg(long, value_name = "ID")]
    name: Option<String>,
    /// User to run as [default: $SUDO_UID's user, else agents.user]; root needs --user root
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    #[command(flatten)]
    rules: RuleFlags,
    /// Report what would be denied and deny nothing
    #[arg(long)]
    audit: bool,
    /// The agent's working directory, {workdir} in profiles [default: the current directory]
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// The agent's home, {home} in profiles and HOME [default: its user's home]
    #[arg(long, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Start even if this host cannot enforce all of the profile's rules (each rule that
    /// is not enforced is printed)
    #[arg(long)]
    degraded_ok: bool,
    /// Say what agentd did (agent name, pid, removed environment, exit)
    #[arg(short, long)]
    verbose: bool,
    /// When the agent ends, say on stderr what was denied to it and why, one line per kind
    /// (the agent itself reads its denials at $AGENTD_DENIALS while it runs)
    #[arg(long)]
    explain: bool,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args)]
struct UpdateCmd {
    /// Agent name (see agentd ps).
    agent: String,
    /// A new profile, by name or path [default: the agent's profile, read again]
    #[arg(long, value_name = "NAME|PATH")]
    profile: Option<String>,
    #[command(flatten)]
    rules: RuleFlags,
    /// Switch to audit mode: report, deny nothing
    #[arg(long, conflicts_with = "enforce")]
    audit: bool,
    /// Switch back to enforcing
    #[arg(long)]
    enforce: bool,
    /// Print the new policy as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ProfilesCmd {
    /// List the profiles in the profiles directory.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print a profile (by name or path).
    Show {
        #[arg(value_name = "NAME|PATH")]
        profile: String,
        /// Print the parsed profile as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check profile files; exit 2 if any is invalid.
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// What NEW allows that OLD did not, and what it denies that OLD allowed, key by key.
    ///
    /// Each line is `allows`, `denies` or `changes` (neither wider nor narrower), the key,
    /// and `+ added`, `- removed` or `old -> new`. Exit status 0: no differences; 1: some;
    /// 2: a profile is invalid.
    ///
    /// Examples:
    ///   agentd profiles diff default ./default-1.1.toml
    ///   agentd profiles diff coding-agent research-agent --json
    #[command(verbatim_doc_comment)]
    Diff {
        #[arg(value_name = "OLD")]
        old: String,
        #[arg(value_name = "NEW")]
        new: String,
        /// Print the differences as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A profile by name (in the profiles directory) or path: where it is and what it says.
fn load_spec(
    config: &Config,
    spec: &str,
) -> (PathBuf, Result<profile::Profile, profile::ProfileError>) {
    if profile::is_path(spec) {
        let path = PathBuf::from(spec);
        let parsed = profile::load_file(&path);
        (path, parsed)
    } else {
        (
            config.profiles_dir.join(format!("{spec}.toml")),
            profile::load_named(&config.profiles_dir, spec),
        )
    }
}

fn load_config(explicit: Option<&std::path::Path>) -> Result<Config, i32> {
    Config::load(explicit).map_err(|e| {
        eprintln!("agentd: {e}");
        EXIT_POLICY
    })
}

fn profiles(config: &Config, cmd: ProfilesCmd) -> i32 {
    match cmd {
        ProfilesCmd::List { json } => {
            let list = match profile::list(&config.profiles_dir) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("agentd: reading {}: {e}", config.profiles_dir.display());
                    return 1;
                }
            };
            let parsed: Vec<_> = list
                .iter()
                .map(|(n, p)| (n, p, profile::load_file(p)))
                .collect();
            if json {
                let v: Vec<_> = parsed
                    .iter()
                    .map(|(n, p, r)| match r {
                        Ok(pr) => serde_json::json!({"name": n, "path": p, "version": pr.version.to_string(), "mode": pr.mode, "description": pr.description}),
                        Err(e) => serde_json::json!({"name": n, "path": p, "error": e.to_string()}),
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).expect("serializable")
                );
                return 0;
            }
            println!("{:<20} {:<10} {:<8} DESCRIPTION", "NAME", "VERSION", "MODE");
            for (n, _, r) in parsed {
                match r {
                    Ok(p) => println!(
                        "{:<20} {:<10} {:<8} {}",
                        n,
                        p.version,
                        format!("{:?}", p.mode).to_lowercase(),
                        p.description
                    ),
                    Err(e) => println!("{n:<20} INVALID    {e}"),
                }
            }
            0
        }
        ProfilesCmd::Show {
            profile: spec,
            json,
        } => {
            let (path, parsed) = load_spec(config, &spec);
            match parsed {
                Ok(p) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&p).expect("serializable")
                    );
                    0
                }
                Ok(_) => {
                    println!("# {}", path.display());
                    print!("{}", std::fs::read_to_string(&path).unwrap_or_default());
                    0
                }
                Err(e) => {
                    eprintln!("agentd: {e}");
                    EXIT_POLICY
                }
            }
        }
        ProfilesCmd::Diff { old, new, json } => {
            let (old, new) = match (load_spec(config, &old).1, load_spec(config, &new).1) {
                (Ok(o), Ok(n)) => (o, n),
                (o, n) => {
                    for e in [o.err(), n.err()].into_iter().flatten() {
                        eprintln!("agentd: {e}");
                    }
                    return EXIT_POLICY;
                }
            };
            let changes = profile::diff::diff(&old, &new);
            if json {
                let v = serde_json::json!({
                    "old": {"name": old.name, "version": old.version.to_string(), "source": old.source},
                    "new": {"name": new.name, "version": new.version.to_string(), "source": new.source},
                    "changes": changes,
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).expect("serializable")
                );
            } else {
                println!(
                    "{} {} ({}) -> {} {} ({}): {}",
                    old.name,
                    old.version,
                    old.source,
                    new.name,
                    new.version,
                    new.source,
                    match changes.len() {
                        0 => "no differences".to_string(),
                        1 => "1 difference".to_string(),
                        n => format!("{n} differences"),
                    }
                );
                for c in &changes {
                    println!("  {}", c.line());
                }
            }
            i32::from(!changes.is_empty())
        }
        ProfilesCmd::Check { files } => {
            let mut status = 0;
            for f in files {
                match profile::load_file(&f) {
                    Ok(p) => println!(
                        "{}: ok: profile {} {} ({:?})",
                        f.display(),
                        p.name,
                        p.version,
                        p.mode
                    ),
                    Err(e) => {
                        eprintln!("{e}");
                        status = EXIT_POLICY;
                    }
                }
            }
            status
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Install { prefix, json } => agentd::install::install(&prefix, json),
        Command::Uninstall {
            prefix,
            purge,
            json,
        } => agentd::install::uninstall(&prefix, purge, json, cli.config.as_deref()),
        Command::Doctor { json } => {
            let report = agentd::doctor::run();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serializable")
                );
            } else {
                print!("{}", agentd::doctor::render(&report));
            }
            if report.usable { 0 } else { 1 }
        }
        Command::Daemon => match load_config(cli.config.as_deref()) {
            Err(code) => code,
            Ok(config) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                match rt.block_on(agentd::daemon::run(config)) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("agentd daemon: {e:#}");
                        1
                    }
                }
            }
        },
        // Inside an agent only the launch socket is needed, and its environment names it:
        // the configuration (which agents may not read: /etc/agentd) is not read.
        Command::Run(r) => match if cli.config.is_none() && client::inside_agent() {
            Ok(Config::default())
        } else {
            load_config(cli.config.as_deref())
        } {
            Err(code) => code,
            Ok(config) => client::run(
                &config,
                RunArgs {
                    profile: r.profile,
                    name: r.name,
                    user: r.user,
                    workdir: r.workdir,
                    home: r.home,
                    degraded_ok: r.degraded_ok,
                    adjustments: r.rules.adjustments(r.audit),
                    verbose: r.verbose,
                    explain: r.explain,
                    argv: r.command,
                },
            ),
        },
        Command::Update(u) => load_config(cli.config.as_deref()).map_or_else(
            |c| c,
            |config| {
                let adjustments = u.rules.adjustments(false);
                let mode = if u.audit {
                    Some(profile::Mode::Audit)
                } else if u.enforce {
                    Some(profile::Mode::Enforce)
                } else {
                    None
                };
                client::update(
                    &config,
                    &u.agent,
                    u.profile.as_deref(),
                    &adjustments,
                    mode,
                    u.json,
                )
            },
        ),
        Command::Events {
            follow,
            agent,
            last,
            json,
        } => load_config(cli.config.as_deref()).map_or_else(
            |c| c,
            |config| client::events(&config, follow, agent, last, json),
        ),
        Command::Reload { json } => load_config(cli.config.as_deref())
            .map_or_else(|c| c, |config| client::reload(&config, json)),
        Command::DebugLog { state } => load_config(cli.config.as_deref())
            .map_or_else(|c| c, |config| client::debug_log(&config, state == "on")),
        Command::Audit {
            command: AuditCmd::Verify { files, json },
        } => load_config(cli.config.as_deref())
            .map_or_else(|c| c, |config| client::audit_verify(&config, files, json)),
        Command::Ps { json } => load_config(cli.config.as_deref())
            .map_or_else(|c| c, |config| client::ps(&config, json)),
        Command::Inspect { agent, json } => load_config(cli.config.as_deref())
            .map_or_else(|c| c, |config| client::inspect(&config, &agent, json)),
        Command::Kill {
            agents,
            all,
            freeze,
            direct,
            json,
        } => {
            let action = if freeze {
                agentd::kill::Action::Freeze
            } else {
                agentd::kill::Action::Kill
            };
            load_config(cli.config.as_deref()).map_or_else(
                |c| c,
                |config| client::kill(&config, &agents, all, action, direct, json),
            )
        }
        Command::Thaw {
            agents,
            all,
            direct,
            json,
        } => load_config(cli.config.as_deref()).map_or_else(
            |c| c,
            |config| {
                client::kill(
                    &config,
                    &agents,
                    all,
                    agentd::kill::Action::Thaw,
                    direct,
                    json,
                )
            },
        ),
        Command::Profiles { command } => load_config(cli.config.as_deref())
            .map_or_else(|c| c, |config| profiles(&config, command)),
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
