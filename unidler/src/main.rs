//! `unidler`: notices the first packet sent to an idle service and reports it.

//!
//! The command line, in [`Command`]'s order: `run` ([`cli::run`]), the commands that ask a
//! running agent and `detach` ([`cli::inspect`]), and `help`. Values are read as operators
//! write them ([`cli::values`]).

mod cli;

use std::{io, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::{EnvFilter, filter::LevelFilter};

use crate::cli::{
    inspect::{self, ClientArgs, DetachArgs},
    run::{self, RunArgs},
};

#[derive(Parser)]
#[command(
    name = "unidler",
    version,
    about = "Wakes idled services: an XDP datapath notices the first packet sent to a \
             load-balancer VIP with no backends and reports it.",
    long_about = None,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(flatten)]
    logging: LoggingArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load the datapath, attach it to interfaces (TC on virtual ones, XDP on
    /// NICs), report idle hits, hold opening packets and replay them.
    ///
    /// With --ovnsb-db, idle hits become Controller_Event rows; without, JSON lines on standard
    /// output. Logs go to standard error. SIGINT or SIGTERM stops it: the datapath is detached,
    /// or, with --pin-dir, left attached and pinned for the next agent.
    Run(Box<RunArgs>),
    /// Show the VIP table of a running agent: backends, state, hits, load balancer.
    Vips(ClientArgs),
    /// Show the most recent idle hits a running agent saw, and what became of each.
    Events(ClientArgs),
    /// Show a running agent's last wake-ups: each phase's time from the first packet (our
    /// row committed, consumed by the CMS, a backend, the forwarding ready, the first replay,
    /// the end) and the outcome.
    Wakeups(ClientArgs),
    /// Show the interfaces a running agent's datapath is on, and with which hook.
    Interfaces(ClientArgs),
    /// Remove a datapath left pinned by `run --pin-dir`: its attachments (detached once no agent
    /// holds them: stop the agent first) and its maps, and the directory.
    Detach(DetachArgs),
    /// Print this message or the help of the given subcommand.
    Help {
        /// The subcommand.
        command: Option<String>,
    },
}

#[derive(Args)]
struct LoggingArgs {
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives.
    #[arg(long, global = true, env = "UNIDLER_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, env = "UNIDLER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = init_logging(&cli.logging) {
        eprintln!("error: {err:#}");
        return ExitCode::from(2);
    }
    if !matches!(cli.command, Command::Run(_)) {
        // A command that prints (into `| head`, say) ends quietly when its reader goes, as
        // command-line tools do. (The agent keeps Rust's default: a write to a closed socket
        // is an error to handle, not the end of the process.)
        // SAFETY: setting a signal's disposition, before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run(args) => {
            if let Some(usage) = run::usage_error(&args) {
                eprintln!("error: {usage}");
                return ExitCode::from(2);
            }
            run::fixed_mmap_threshold();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")
                .and_then(|rt| rt.block_on(run::run(*args)))
        }
        Command::Vips(args) => inspect::show_vips(&args),
        Command::Events(args) => inspect::show_events(&args),
        Command::Wakeups(args) => inspect::show_wakeups(&args),
        Command::Interfaces(args) => inspect::show_interfaces(&args),
        Command::Detach(args) => inspect::detach(&args),
        Command::Help { command } => match print_help(command.as_deref()) {
            Ok(()) => Ok(()),
            Err(usage) => {
                eprintln!("error: {usage}");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Said whatever the filter: the reason the agent stops is never hidden.
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{err:#}");
            } else {
                eprintln!("error: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `unidler help [COMMAND]`: the same text as `--help`; an unknown command is a usage error.
fn print_help(command: Option<&str>) -> Result<(), String> {
    use clap::CommandFactory as _;
    let mut cli = Cli::command();
    // Built, so that a subcommand's usage names the binary (`unidler run`).
    cli.build();
    let help = match command {
        None => cli.render_long_help(),
        Some(name) => cli
            .find_subcommand_mut(name)
            .ok_or_else(|| format!("no subcommand {name:?} (see `unidler --help`)"))?
            .render_long_help(),
    };
    print!("{help}");
    Ok(())
}

/// The log levels `--log-level` takes by name (`warning` as `warn`).
const LOG_LEVELS: [&str; 7] = ["off", "error", "warn", "warning", "info", "debug", "trace"];

fn init_logging(args: &LoggingArgs) -> Result<()> {
    let text = args.log_level.trim();
    let bad = |why: String| {
        anyhow::anyhow!(
            "bad log level {text:?} (--log-level, UNIDLER_LOG_LEVEL): {why}; expected one of \
             off, error, warn, info, debug, trace, or tracing directives (TARGET=LEVEL,...)"
        )
    };
    // A bare word is a level: tracing would take an unknown one for a target, and log
    // nothing else, errors included.
    let text = if text.contains(['=', ',']) {
        text.to_owned()
    } else {
        match text.to_ascii_lowercase().as_str() {
            "warning" => "warn".to_owned(),
            level if LOG_LEVELS.contains(&level) => level.to_owned(),
            _ => return Err(bad("not a level".into())),
        }
    };
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .parse(&text)
        .map_err(|e| {
            bad(e
                .to_string()
                .split(": ")
                .next()
                .unwrap_or_default()
                .to_owned())
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()));
    match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
