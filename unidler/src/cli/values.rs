//! How option values are written: durations, sizes, listen addresses.

use std::{net::SocketAddr, time::Duration};

/// A duration: a number and a unit (ms, s, m, h, d), or several (`1h30m`); a bare number is
/// seconds.
pub(crate) fn humantime_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("bad duration {s:?} (e.g. 500ms, 30s, 5m, 1h, 1h30m)");
    if s.is_empty() {
        return Err(bad());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map(Duration::from_secs).map_err(|_| bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit_len = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len() - digits);
        let unit = &rest[digits..digits + unit_len];
        let one = match unit {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3_600),
            "d" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        total = u32::try_from(n)
            .ok()
            .and_then(|n| one.checked_mul(n))
            .and_then(|d| total.checked_add(d))
            .ok_or_else(bad)?;
        rest = &rest[digits + unit_len..];
    }
    Ok(total)
}

/// A size in bytes: a number, with an optional unit: KiB, MiB, GiB (or Ki, Mi, Gi, K, M, G:
/// powers of 1024) or kB, MB, GB (powers of 1000).
pub(crate) fn byte_size(s: &str) -> Result<usize, String> {
    let bad = || format!("bad size {s:?} (e.g. 67108864, 64MiB, 64Mi, 100MB)");
    let at = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: usize = s[..at].parse().map_err(|_| bad())?;
    let unit: usize = match s[at..].trim() {
        "" | "B" => 1,
        "K" | "Ki" | "KiB" => 1 << 10,
        "M" | "Mi" | "MiB" => 1 << 20,
        "G" | "Gi" | "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(unit).ok_or_else(bad)
}

/// An address to listen on: `IP:PORT`, `[IP]:PORT`, or `:PORT` for every address (`[::]`,
/// which takes IPv4 too; the endpoint falls back to 0.0.0.0 on a node without IPv6).
pub(crate) fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("bad port in {s:?} (e.g. :9477)"))?;
        return Ok(SocketAddr::new(
            std::net::Ipv6Addr::UNSPECIFIED.into(),
            port,
        ));
    }
    s.parse().map_err(|_| {
        format!("bad address {s:?} (IP:PORT, [IPv6]:PORT, or :PORT for every address)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_every_unit_and_combinations() {
        let d = |s| humantime_duration(s);
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(d("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(d("15"), Ok(Duration::from_secs(15)));
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(d("1h"), Ok(Duration::from_secs(3_600)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(d("1d"), Ok(Duration::from_secs(86_400)));
        for bad in ["", "s", "1x", "1h30", "-1s", "99999999999999999999s"] {
            assert!(d(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(byte_size("67108864"), Ok(64 << 20));
        assert_eq!(byte_size("64MiB"), Ok(64 << 20));
        assert_eq!(byte_size("64Mi"), Ok(64 << 20));
        assert_eq!(byte_size("100MB"), Ok(100_000_000));
        assert_eq!(byte_size("1GiB"), Ok(1 << 30));
        for bad in ["", "MiB", "64 XB", "1.5MiB"] {
            assert!(byte_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listen_addresses_take_a_bare_port_for_every_address() {
        assert_eq!(listen_addr(":9477"), Ok("[::]:9477".parse().unwrap()));
        assert_eq!(
            listen_addr("127.0.0.1:9477"),
            Ok("127.0.0.1:9477".parse().unwrap())
        );
        assert_eq!(
            listen_addr("[fd00::1]:9477"),
            Ok("[fd00::1]:9477".parse().unwrap())
        );
        assert!(listen_addr("fd00::1:9477").is_err());
        assert!(listen_addr(":http").is_err());
    }
}
