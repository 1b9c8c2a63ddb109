//! The commands that ask a running agent (`vips`, `events`, `wakeups`, `interfaces`) and
//! `detach`, which removes what an agent left pinned.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::Args;
use unidler::telemetry::{self, EventRow, InterfaceRow, VipRow, WakeupRow};

use super::{run::DEFAULT_API_ADDR, values::listen_addr};

/// Where to reach the agent: as its `--api-addr` is written, with every address (`:PORT`,
/// `[::]`, `0.0.0.0`) reached on loopback.
fn agent_addr(s: &str) -> Result<SocketAddr, String> {
    let mut addr = listen_addr(s)?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(addr)
}

/// `unidler detach`'s options.
#[derive(Args)]
pub(crate) struct DetachArgs {
    /// The agent's --pin-dir.
    #[arg(long, env = "UNIDLER_PIN_DIR")]
    pin_dir: PathBuf,
}

/// The options of the commands that ask a running agent.
#[derive(Args)]
pub(crate) struct ClientArgs {
    /// The agent's --api-addr (`:PORT`: this host's loopback).
    #[arg(long, env = "UNIDLER_API_ADDR", default_value = DEFAULT_API_ADDR, value_parser = agent_addr)]
    api_addr: SocketAddr,
    /// Print JSON instead of a table.
    #[arg(long, env = "UNIDLER_JSON")]
    json: bool,
}

/// Asks the agent for the rows at `path`: printed as the agent's JSON with `--json` (None),
/// else read for a table.
fn ask<T: serde::de::DeserializeOwned>(args: &ClientArgs, path: &str) -> Result<Option<Vec<T>>> {
    let body = telemetry::http_get(args.api_addr, path)?;
    if args.json {
        println!("{body}");
        return Ok(None);
    }
    serde_json::from_str(&body)
        .map(Some)
        .with_context(|| format!("the agent's answer at {path}"))
}

/// `unidler detach`.
pub(crate) fn detach(args: &DetachArgs) -> Result<()> {
    let detached = unidler::pinning::remove(&args.pin_dir)
        .with_context(|| format!("--pin-dir {}", args.pin_dir.display()))?;
    for iface in &detached {
        println!("detached from {iface}");
    }
    println!(
        "removed {} ({} attachments, and the maps)",
        args.pin_dir.display(),
        detached.len()
    );
    Ok(())
}

/// `unidler vips`.
pub(crate) fn show_vips(args: &ClientArgs) -> Result<()> {
    let Some(rows) = ask::<VipRow>(args, "/api/vips")? else {
        return Ok(());
    };
    let table: Vec<[String; 8]> = rows
        .into_iter()
        .map(|r| {
            // A scoped VIP's state per scope: `scope:backends`.
            let scopes = if r.scopes.is_empty() {
                "-".to_owned()
            } else {
                r.scopes
                    .iter()
                    .map(|s| format!("{}:{}", s.scope, s.backends))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            [
                r.vip,
                r.protocol,
                r.state,
                r.backends.to_string(),
                r.hits.to_string(),
                r.held.to_string(),
                r.load_balancer.unwrap_or_else(|| "-".into()),
                scopes,
            ]
        })
        .collect();
    print_table(
        [
            "VIP",
            "PROTO",
            "STATE",
            "BACKENDS",
            "HITS",
            "HELD",
            "LOAD BALANCER",
            "SCOPES",
        ],
        &table,
    );
    Ok(())
}

/// `unidler interfaces`.
pub(crate) fn show_interfaces(args: &ClientArgs) -> Result<()> {
    let Some(rows) = ask::<InterfaceRow>(args, "/api/interfaces")? else {
        return Ok(());
    };
    let table: Vec<[String; 5]> = rows
        .into_iter()
        .map(|r| {
            let scope = r.scope.map_or_else(|| "-".into(), |s| s.to_string());
            [r.iface, r.ifindex.to_string(), r.hook, scope, r.attachment]
        })
        .collect();
    print_table(
        ["INTERFACE", "IFINDEX", "HOOK", "SCOPE", "ATTACHMENT"],
        &table,
    );
    Ok(())
}

/// `unidler events`.
pub(crate) fn show_events(args: &ClientArgs) -> Result<()> {
    let Some(rows) = ask::<EventRow>(args, "/api/events")? else {
        return Ok(());
    };
    let table: Vec<[String; 7]> = rows
        .into_iter()
        .map(|e| {
            [
                e.time,
                e.vip,
                e.protocol,
                e.src,
                e.iface,
                e.action,
                e.wakeup.unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(
        [
            "TIME", "VIP", "PROTO", "SOURCE", "IFACE", "ACTION", "WAKE-UP",
        ],
        &table,
    );
    Ok(())
}

/// `unidler wakeups`.
pub(crate) fn show_wakeups(args: &ClientArgs) -> Result<()> {
    let Some(rows) = ask::<WakeupRow>(args, "/api/wakeups")? else {
        return Ok(());
    };
    let phase = |row: &WakeupRow, name: &str| {
        row.phases
            .iter()
            .find(|(p, _)| p == name)
            .map_or_else(|| "-".into(), |(_, s)| format!("{s:.3}"))
    };
    let table: Vec<[String; 13]> = rows
        .iter()
        .map(|r| {
            [
                r.started.clone(),
                r.vip.clone(),
                r.protocol.clone(),
                r.load_balancer.clone().unwrap_or_else(|| "-".into()),
                r.outcome.clone().unwrap_or_else(|| "waking".into()),
                r.held.to_string(),
                r.replayed.to_string(),
                phase(r, "committed"),
                phase(r, "consumed"),
                phase(r, "backend"),
                phase(r, "forwarding"),
                phase(r, "replayed"),
                phase(r, "finished"),
            ]
        })
        .collect();
    println!("Seconds from the first packet to each phase:");
    print_table(
        [
            "STARTED",
            "VIP",
            "PROTO",
            "LOAD BALANCER",
            "OUTCOME",
            "HELD",
            "REPLAYED",
            "COMMITTED",
            "CONSUMED",
            "BACKEND",
            "FORWARDING",
            "REPLAYED AT",
            "FINISHED",
        ],
        &table,
    );
    Ok(())
}

/// Prints rows under a header with every column aligned.
fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
