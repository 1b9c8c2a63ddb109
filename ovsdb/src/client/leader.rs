//! The leader of a clustered database: whether a server is usable (`_Server`), and whether
//! it still leads.

use super::*;

/// Asks `_Server` whether this server can serve `database` as leader, and monitors the
/// answer. Returns false for a follower (or a member cut off from its cluster).
pub(super) async fn watch_leadership(conn: &Connection, database: &str) -> Result<bool, Error> {
    let reply = conn
        .call(
            "monitor_cond",
            json!(["_Server", SERVER_MONITOR, {"Database": [{
                "columns": ["name", "model", "leader", "connected"],
                "where": [["name", "==", database]],
            }]}]),
        )
        .await;
    let reply = match reply {
        Ok(r) => r,
        // Servers without _Server (very old) have no clusters either.
        Err(Error::Rpc {
            kind: ErrorKind::UnknownDatabase,
            ..
        }) => return Ok(true),
        Err(e) => return Err(e),
    };
    let rows = reply
        .get("Database")
        .and_then(Json::as_object)
        .ok_or_else(|| Error::Protocol(format!("server has no database {database:?}")))?;
    let Some(row) = rows
        .values()
        .filter_map(|u| u.get("initial"))
        .find(|r| r.get("name").and_then(Json::as_str) == Some(database))
    else {
        return Err(Error::Rpc {
            kind: ErrorKind::UnknownDatabase,
            details: Some(database.to_owned()),
        });
    };
    Ok(is_usable(row))
}

/// Whether a whole `_Server.Database` row says the server can serve writes: standalone, or
/// clustered, connected and leader. The server leaves out booleans that are false.
pub(super) fn is_usable(row: &Json) -> bool {
    let clustered = row.get("model").and_then(Json::as_str) == Some("clustered");
    let flag = |c: &str| row.get(c).and_then(Json::as_bool).unwrap_or(false);
    !clustered || (flag("leader") && flag("connected"))
}

/// Whether an update of the `_Server` monitor leaves the server usable as leader.
pub(super) fn still_leader(updates: &Json, database: &str) -> bool {
    updates
        .get("Database")
        .and_then(Json::as_object)
        .map(|rows| {
            rows.values().all(|u| {
                if let Some(diff) = u.get("modify") {
                    // A modify carries only changed columns: absent ones keep their value.
                    diff.get("leader").and_then(Json::as_bool) != Some(false)
                        && diff.get("connected").and_then(Json::as_bool) != Some(false)
                } else if let Some(row) = u.get("insert").or(u.get("initial")) {
                    row.get("name").and_then(Json::as_str) != Some(database) || is_usable(row)
                } else {
                    u.get("delete").is_none()
                }
            })
        })
        .unwrap_or(true)
}
