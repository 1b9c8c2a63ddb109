//! One JSON-RPC 1.0 session over a byte stream (RFC 7047 §4): requests matched to replies by
//! id, notifications handed out, the server's `echo` answered, and an inactivity probe.
//!
//! A task owns the stream. It ends (failing every pending request with
//! [`Error::Disconnected`]) when the stream closes, the server breaks the protocol or sends
//! an oversized message, the probe goes unanswered, or every [`Connection`] handle is dropped.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Value as Json, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::{mpsc, oneshot, watch},
};

use crate::{
    error::{Error, ErrorKind},
    remote::Stream,
};

/// Settings of a session.
#[derive(Clone, Copy, Debug)]
pub struct RpcOptions {
    /// Send an `echo` after this long without hearing from the server; give up after twice
    /// as long. `None` disables the probe.
    pub probe_interval: Option<Duration>,
    /// Largest message accepted from the server, in bytes.
    pub max_message_bytes: usize,
}

impl Default for RpcOptions {
    fn default() -> Self {
        Self {
            probe_interval: Some(Duration::from_secs(5)),
            max_message_bytes: 64 << 20,
        }
    }
}

/// A notification from the server (`update2`, `update3`, `locked`, ...).
#[derive(Clone, Debug)]
pub struct Notification {
    /// The method name.
    pub method: String,
    /// Its params array.
    pub params: Json,
}

struct Request {
    method: String,
    params: Json,
    reply: oneshot::Sender<Result<Json, Error>>,
}

/// A handle to a running session. Cheap to clone.
#[derive(Clone)]
pub struct Connection {
    requests: mpsc::UnboundedSender<Request>,
    closed: watch::Receiver<Option<Arc<Error>>>,
}

impl Connection {
    /// Starts a session on `stream`; notifications go to the returned receiver.
    pub fn start(
        stream: Box<dyn Stream>,
        options: RpcOptions,
    ) -> (Self, mpsc::UnboundedReceiver<Notification>) {
        let (requests_tx, requests_rx) = mpsc::unbounded_channel();
        let (notify_tx, notify_rx) = mpsc::unbounded_channel();
        let (closed_tx, closed_rx) = watch::channel(None);
        tokio::spawn(async move {
            let reason = run(stream, options, requests_rx, notify_tx).await;
            tracing::debug!("OVSDB session ended: {reason}");
            let _ = closed_tx.send(Some(Arc::new(reason)));
        });
        (
            Self {
                requests: requests_tx,
                closed: closed_rx,
            },
            notify_rx,
        )
    }

    /// Sends a request and waits for its result.
    pub async fn call(&self, method: &str, params: Json) -> Result<Json, Error> {
        let (reply, result) = oneshot::channel();
        self.requests
            .send(Request {
                method: method.to_owned(),
                params,
                reply,
            })
            .map_err(|_| Error::Disconnected)?;
        result.await.map_err(|_| Error::Disconnected)?
    }

    /// Waits until the session has ended; returns why.
    pub async fn closed(&self) -> Arc<Error> {
        let mut closed = self.closed.clone();
        loop {
            if let Some(reason) = closed.borrow_and_update().clone() {
                return reason;
            }
            if closed.changed().await.is_err() {
                return Arc::new(Error::Disconnected);
            }
        }
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }
}

/// Id of our own probe echo; request ids are numbers, so it never collides.
const PROBE_ID: &str = "unidler-probe";

async fn run(
    stream: Box<dyn Stream>,
    options: RpcOptions,
    mut requests: mpsc::UnboundedReceiver<Request>,
    notify: mpsc::UnboundedSender<Notification>,
) -> Error {
    let (mut reader, writer) = tokio::io::split(stream);
    // Writing is a task of its own: a server that stops reading (ovsdb-server does while it
    // has a backlog for us) must not stop us reading its messages or keeping time.
    let (outgoing, writer_failed, _writer) = spawn_writer(writer);
    let mut writer_failed = std::pin::pin!(writer_failed);
    let mut pending: HashMap<u64, oneshot::Sender<Result<Json, Error>>> = HashMap::new();
    let mut next_id: u64 = 1;
    let mut framer = Framer::default();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut last_heard = Instant::now();
    let mut probe_sent: Option<Instant> = None;
    let tick = options.probe_interval.unwrap_or(Duration::from_secs(3600)) / 2;
    let mut ticker = tokio::time::interval(tick.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let reason = loop {
        // Reading first: after a stall, a reply already in the socket is taken before the
        // probe timer can count it missing.
        tokio::select! {
            biased;
            read = reader.read(&mut chunk) => {
                let n = match read {
                    Ok(0) => break Error::Disconnected,
                    Ok(n) => n,
                    Err(e) => break Error::Io(e),
                };
                last_heard = Instant::now();
                probe_sent = None;
                let messages = match framer.push(&chunk[..n], options.max_message_bytes) {
                    Ok(m) => m,
                    Err(e) => break e,
                };
                if let Some(e) = messages
                    .into_iter()
                    .find_map(|msg| dispatch(msg, &mut pending, &notify, &outgoing).err())
                {
                    break e;
                }
            }
            failure = &mut writer_failed => break failure,
            request = requests.recv() => {
                let Some(Request { method, params, reply }) = request else {
                    break Error::Disconnected;
                };
                let id = next_id;
                next_id += 1;
                send(&outgoing, &json!({"id": id, "method": method, "params": params}));
                pending.insert(id, reply);
            }
            _ = ticker.tick(), if options.probe_interval.is_some() => {
                let interval = options.probe_interval.expect("guarded");
                match probe_sent {
                    Some(sent) if sent.elapsed() >= interval => break Error::Timeout(interval * 2),
                    None if last_heard.elapsed() >= interval => {
                        send(&outgoing, &json!({"id": PROBE_ID, "method": "echo", "params": []}));
                        probe_sent = Some(Instant::now());
                    }
                    _ => {}
                }
            }
        }
    };
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(Error::Disconnected));
    }
    // The writer is aborted with `_writer` (it may be stuck writing to a server that does
    // not read); dropping both halves closes the stream.
    reason
}

/// Messages on their way to the server.
type Outgoing = mpsc::UnboundedSender<Vec<u8>>;

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the task that writes queued messages to `writer` in order. Returns the queue, a
/// future that completes with the reason if writing fails, and the task (aborted on drop).
fn spawn_writer(
    mut writer: impl tokio::io::AsyncWrite + Unpin + Send + 'static,
) -> (
    Outgoing,
    impl std::future::Future<Output = Error>,
    AbortOnDrop,
) {
    let (outgoing, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
    let (failed_tx, failed_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        while let Some(bytes) = queue.recv().await {
            let written = async {
                writer.write_all(&bytes).await?;
                writer.flush().await
            };
            if let Err(e) = written.await {
                let _ = failed_tx.send(Error::Io(e));
                return;
            }
        }
    });
    let failed = async move {
        match failed_rx.await {
            Ok(e) => e,
            // The writer ended without failing: only after the loop has ended.
            Err(_) => std::future::pending().await,
        }
    };
    (outgoing, failed, AbortOnDrop(task))
}

/// Queues a message for the writer. (If the writer is gone, the loop learns why from it.)
fn send(outgoing: &Outgoing, msg: &Json) {
    let bytes = serde_json::to_vec(msg).expect("JSON values serialize");
    let _ = outgoing.send(bytes);
}

/// Cuts the byte stream from the server into JSON messages. Each byte is scanned once, and a
/// message is parsed only once it is complete: a large monitor reply arriving in many reads
/// costs one parse, not one per read.
#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// How far `buf` has been scanned.
    scanned: usize,
    /// Nesting depth of `{`/`[` at `scanned`, outside strings.
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl Framer {
    /// Keeps at most this much buffer capacity between messages (a large reply's buffer is
    /// given back once it has been parsed).
    const KEEP_CAPACITY: usize = 64 * 1024;

    /// Appends `bytes` and returns the messages now complete; a partial one stays buffered.
    /// A message (whole or partial) longer than `limit` is an error, as is anything that is
    /// not JSON objects and arrays separated by white space.
    pub fn push(&mut self, bytes: &[u8], limit: usize) -> Result<Vec<Json>, Error> {
        self.buf.extend_from_slice(bytes);
        let mut messages = Vec::new();
        let mut start = 0;
        for i in self.scanned..self.buf.len() {
            let b = self.buf[i];
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' if self.depth > 0 => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        // Whole or not, a message over the limit is refused.
                        if i + 1 - start > limit {
                            return Err(Error::Oversized { limit });
                        }
                        let msg = serde_json::from_slice(&self.buf[start..=i]).map_err(|e| {
                            Error::Protocol(format!("invalid JSON from server: {e}"))
                        })?;
                        messages.push(msg);
                        start = i + 1;
                    }
                }
                b' ' | b'\t' | b'\r' | b'\n' if self.depth == 0 => start = i + 1,
                _ if self.depth == 0 => {
                    return Err(Error::Protocol(format!(
                        "invalid JSON from server: unexpected byte {:?} between messages",
                        b as char
                    )));
                }
                _ => {}
            }
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        if self.buf.len() > limit {
            return Err(Error::Oversized { limit });
        }
        if self.buf.capacity() > Self::KEEP_CAPACITY && self.buf.len() < Self::KEEP_CAPACITY {
            self.buf.shrink_to(Self::KEEP_CAPACITY);
        }
        Ok(messages)
    }
}

/// Handles one message from the server: answers its `echo` and unknown requests, hands out
/// notifications, and completes the request a reply is for.
fn dispatch(
    msg: Json,
    pending: &mut HashMap<u64, oneshot::Sender<Result<Json, Error>>>,
    notify: &mpsc::UnboundedSender<Notification>,
    outgoing: &Outgoing,
) -> Result<(), Error> {
    let obj = msg
        .as_object()
        .ok_or_else(|| Error::Protocol(format!("message is not an object: {msg}")))?;
    match obj.get("method").and_then(Json::as_str) {
        Some("echo") => {
            let id = obj.get("id").cloned().unwrap_or(Json::Null);
            let params = obj.get("params").cloned().unwrap_or(json!([]));
            send(
                outgoing,
                &json!({"id": id, "result": params, "error": null}),
            );
            Ok(())
        }
        Some(method) => {
            let params = obj.get("params").cloned().unwrap_or(json!([]));
            if obj.get("id").is_none_or(Json::is_null) {
                let _ = notify.send(Notification {
                    method: method.to_owned(),
                    params,
                });
                Ok(())
            } else {
                // A request we do not serve: say so rather than leave the server waiting.
                let id = obj["id"].clone();
                send(
                    outgoing,
                    &json!({"id": id, "result": null, "error": "unknown method"}),
                );
                Ok(())
            }
        }
        None => {
            let id = obj.get("id");
            if id.and_then(Json::as_str) == Some(PROBE_ID) {
                return Ok(());
            }
            let id = id
                .and_then(Json::as_u64)
                .ok_or_else(|| Error::Protocol(format!("reply with an id we never sent: {msg}")))?;
            let reply = pending
                .remove(&id)
                .ok_or_else(|| Error::Protocol(format!("reply to unknown request {id}")))?;
            let result = match obj.get("error") {
                Some(err) if !err.is_null() => Err(rpc_error(err)),
                _ => Ok(obj.get("result").cloned().unwrap_or(Json::Null)),
            };
            let _ = reply.send(result);
            Ok(())
        }
    }
}

fn rpc_error(err: &Json) -> Error {
    let (kind, details) = match err {
        Json::String(s) => (s.clone(), None),
        Json::Object(o) => (
            o.get("error")
                .and_then(Json::as_str)
                .unwrap_or("unknown error")
                .to_owned(),
            o.get("details").and_then(Json::as_str).map(str::to_owned),
        ),
        other => (other.to_string(), None),
    };
    Error::Rpc {
        kind: ErrorKind::from_server(&kind),
        details,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_concatenated_and_partial_messages() {
        let mut framer = Framer::default();
        let msgs = framer
            .push(
                br#"{"id":1,"result":[]} {"method":"update2","params":[1]}{"id":2,"res"#,
                1 << 20,
            )
            .unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(framer.buf, br#"{"id":2,"res"#);
        let msgs = framer.push(br#"ult":"a \"}]\\"}"#, 1 << 20).unwrap();
        assert_eq!(msgs, vec![json!({"id": 2, "result": "a \"}]\\"})]);
        assert!(framer.buf.is_empty());
    }

    #[test]
    fn rejects_garbage_and_oversized() {
        for garbage in [&b"{]"[..], b"x{}", b"{\"a\":}"] {
            assert!(
                matches!(
                    Framer::default().push(garbage, 1 << 20),
                    Err(Error::Protocol(_))
                ),
                "{garbage:?}"
            );
        }
        let mut big = b"{\"id\":1,\"result\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', 2000));
        assert!(matches!(
            Framer::default().push(&big, 1000),
            Err(Error::Oversized { limit: 1000 })
        ));
        // A whole message over the limit in one read is refused too.
        big.extend_from_slice(b"\"}");
        assert!(matches!(
            Framer::default().push(&big, 1000),
            Err(Error::Oversized { limit: 1000 })
        ));
    }

    #[test]
    fn a_message_split_at_every_byte_is_parsed_once_whole() {
        let text =
            br#" {"id":7,"result":{"t":{"u":{"new":{"s":"x\\\"{[","m":["map",[["k","}"]]]}}}}}"#;
        let mut framer = Framer::default();
        let mut got = Vec::new();
        for b in text {
            got.extend(framer.push(&[*b], 1 << 20).unwrap());
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["result"]["t"]["u"]["new"]["s"], "x\\\"{[");
        assert!(framer.buf.is_empty());
    }
}
