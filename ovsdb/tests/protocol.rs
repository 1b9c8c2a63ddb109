//! A JSON-RPC session against a misbehaving fake server: the client fails cleanly, never
//! panics or hangs.

use std::time::Duration;

use ovsdb::{
    Error,
    rpc::{Connection, RpcOptions},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream},
    time::timeout,
};

const LIMIT: Duration = Duration::from_secs(5);

fn session(options: RpcOptions) -> (Connection, DuplexStream) {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (conn, _notifications) = Connection::start(Box::new(ours), options);
    (conn, theirs)
}

/// Reads one JSON message the client sent.
async fn read_request(server: &mut DuplexStream) -> Value {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    loop {
        let n = server.read(&mut byte).await.unwrap();
        assert!(n > 0, "client closed");
        buf.extend_from_slice(&byte[..n]);
        if let Ok(v) = serde_json::from_slice(&buf) {
            return v;
        }
    }
}

#[tokio::test]
async fn malformed_json_fails_the_pending_call() {
    let (conn, mut server) = session(RpcOptions::default());
    let call = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call("list_dbs", json!([])).await }
    });
    read_request(&mut server).await;
    server
        .write_all(b"{\"id\": 1, \"result\": ]")
        .await
        .unwrap();
    let result = timeout(LIMIT, call).await.unwrap().unwrap();
    assert!(matches!(result, Err(Error::Disconnected)), "{result:?}");
    let reason = timeout(LIMIT, conn.closed()).await.unwrap();
    assert!(matches!(&*reason, Error::Protocol(_)), "{reason:?}");
}

#[tokio::test]
async fn an_oversized_message_closes_the_session() {
    let (conn, mut server) = session(RpcOptions {
        max_message_bytes: 10_000,
        ..RpcOptions::default()
    });
    let call = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call("list_dbs", json!([])).await }
    });
    read_request(&mut server).await;
    let huge = format!("{{\"id\": 1, \"result\": [\"{}", "x".repeat(50_000));
    server.write_all(huge.as_bytes()).await.unwrap();
    assert!(timeout(LIMIT, call).await.unwrap().unwrap().is_err());
    let reason = timeout(LIMIT, conn.closed()).await.unwrap();
    assert!(
        matches!(&*reason, Error::Oversized { limit: 10_000 }),
        "{reason:?}"
    );
}

#[tokio::test]
async fn replies_match_requests_and_server_echo_is_answered() {
    let (conn, mut server) = session(RpcOptions::default());
    let a = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call("first", json!([])).await }
    });
    let first = read_request(&mut server).await;
    let b = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call("second", json!([])).await }
    });
    let second = read_request(&mut server).await;
    // Server pings us in between, then answers out of order, one with an error.
    server
        .write_all(br#"{"id":"ping","method":"echo","params":["x"]}"#)
        .await
        .unwrap();
    let echo = read_request(&mut server).await;
    assert_eq!(echo["id"], "ping");
    assert_eq!(echo["result"], json!(["x"]));
    let reply2 = json!({"id": second["id"], "result": null, "error": {"error": "unknown database", "details": "x"}});
    let reply1 = json!({"id": first["id"], "result": ["db"], "error": null});
    server
        .write_all(reply2.to_string().as_bytes())
        .await
        .unwrap();
    server
        .write_all(reply1.to_string().as_bytes())
        .await
        .unwrap();
    assert_eq!(a.await.unwrap().unwrap(), json!(["db"]));
    assert!(matches!(
        b.await.unwrap(),
        Err(Error::Rpc {
            kind: ovsdb::ErrorKind::UnknownDatabase,
            ..
        })
    ));
}

#[tokio::test]
async fn a_silent_server_is_probed_then_dropped() {
    let (conn, mut server) = session(RpcOptions {
        probe_interval: Some(Duration::from_millis(200)),
        ..RpcOptions::default()
    });
    let probe = timeout(LIMIT, read_request(&mut server)).await.unwrap();
    assert_eq!(probe["method"], "echo");
    // Never answer: the session must end on its own.
    let reason = timeout(LIMIT, conn.closed()).await.unwrap();
    assert!(matches!(&*reason, Error::Timeout(_)), "{reason:?}");
    assert!(matches!(
        conn.call("list_dbs", json!([])).await,
        Err(Error::Disconnected)
    ));
}

#[tokio::test]
async fn a_reply_to_nothing_is_a_protocol_violation() {
    let (conn, mut server) = session(RpcOptions::default());
    server
        .write_all(br#"{"id": 99, "result": [], "error": null}"#)
        .await
        .unwrap();
    let reason = timeout(LIMIT, conn.closed()).await.unwrap();
    assert!(matches!(&*reason, Error::Protocol(_)), "{reason:?}");
}

#[tokio::test]
async fn a_server_that_stops_reading_is_still_heard() {
    // A pipe far smaller than our request: writing it blocks, as towards a server that
    // stops reading a client with an output backlog.
    let (ours, mut theirs) = tokio::io::duplex(1024);
    let (conn, mut notifications) = Connection::start(Box::new(ours), RpcOptions::default());
    tokio::spawn({
        let conn = conn.clone();
        async move { conn.call("transact", json!(["x".repeat(1 << 20)])).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    theirs
        .write_all(br#"{"id":null,"method":"update2","params":["data",{}]}"#)
        .await
        .unwrap();
    let heard = timeout(LIMIT, notifications.recv())
        .await
        .expect("a notification must be read while our own write is blocked")
        .expect("session alive");
    assert_eq!(heard.method, "update2");
    assert!(!conn.is_closed());
}
