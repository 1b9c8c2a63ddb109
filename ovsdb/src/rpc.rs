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
    /// Its params array, unparsed.
    pub params: RawJson,
}

/// A JSON text from the server, kept unparsed: part of one message, which it owns. Large
/// replies (a monitor's first one carries whole tables) can so be parsed as a stream.
#[derive(Clone)]
pub struct RawJson {
    message: Arc<String>,
    span: std::ops::Range<usize>,
}

impl RawJson {
    /// The JSON text.
    pub fn get(&self) -> &str {
        &self.message[self.span.clone()]
    }

    /// Parses it into a tree.
    pub fn parse(&self) -> Result<Json, Error> {
        serde_json::from_str(self.get())
            .map_err(|e| Error::Protocol(format!("invalid JSON from server: {e}")))
    }

    /// `null`.
    fn null() -> Self {
        Self {
            message: Arc::new("null".to_owned()),
            span: 0..4,
        }
    }
}

impl std::fmt::Debug for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.get();
        match text.char_indices().nth(200) {
            Some((at, _)) => write!(f, "{}...", &text[..at]),
            None => f.write_str(text),
        }
    }
}

impl std::fmt::Display for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

type Reply = oneshot::Sender<Result<RawJson, Error>>;

struct Request {
    method: String,
    params: Json,
    reply: Reply,
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
        self.call_raw(method, params).await?.parse()
    }

    /// Sends a request and waits for its result, unparsed.
    pub async fn call_raw(&self, method: &str, params: Json) -> Result<RawJson, Error> {
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
    let mut pending: HashMap<u64, Reply> = HashMap::new();
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

/// Cuts the byte stream from the server into messages. Each byte is scanned once, and a
/// message is handed out only once it is complete: a large monitor reply arriving in many
/// reads is parsed once, by whoever takes it, not once per read.
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
    /// handed over with it).
    const KEEP_CAPACITY: usize = 64 * 1024;

    /// Appends `bytes` and returns the messages now complete (each a JSON object or array,
    /// not yet checked further); a partial one stays buffered. A message (whole or partial)
    /// longer than `limit` is an error, as is anything between messages but white space.
    pub fn push(&mut self, bytes: &[u8], limit: usize) -> Result<Vec<Vec<u8>>, Error> {
        self.buf.extend_from_slice(bytes);
        let mut messages = Vec::new();
        let mut start = 0;
        let mut i = self.scanned;
        while i < self.buf.len() {
            if self.in_string && !self.escaped {
                // Most of a large message is string text: skip to its next quote or escape.
                match memchr::memchr2(b'"', b'\\', &self.buf[i..]) {
                    Some(at) => i += at,
                    None => break,
                }
            }
            let b = self.buf[i];
            i += 1;
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
                        if i - start > limit {
                            return Err(Error::Oversized { limit });
                        }
                        if start == 0 && i == self.buf.len() {
                            // The whole buffer (a large reply, typically): handed over, not copied.
                            messages.push(std::mem::take(&mut self.buf));
                            start = 0;
                            i = 0;
                        } else {
                            messages.push(self.buf[start..i].to_vec());
                            start = i;
                        }
                    }
                }
                b' ' | b'\t' | b'\r' | b'\n' if self.depth == 0 => start = i,
                _ if self.depth == 0 => {
                    return Err(Error::Protocol(format!(
                        "invalid JSON from server: unexpected byte {:?} between messages",
                        b as char
                    )));
                }
                _ => {}
            }
        }
        self.buf.drain(..start.min(self.buf.len()));
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

/// The envelope of a message: its members, the large ones (`params`, `result`) unparsed.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    id: Json,
    #[serde(default)]
    method: Option<String>,
    #[serde(default, borrow)]
    params: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    result: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    error: Json,
}

/// The part of `message` that `part` (borrowed from it) is.
fn raw_part(message: &Arc<String>, part: Option<&serde_json::value::RawValue>) -> RawJson {
    match part {
        Some(part) => {
            let at = part.get().as_ptr() as usize - message.as_ptr() as usize;
            RawJson {
                message: message.clone(),
                span: at..at + part.get().len(),
            }
        }
        None => RawJson::null(),
    }
}

/// Handles one message from the server: answers its `echo` and unknown requests, hands out
/// notifications, and completes the request a reply is for.
fn dispatch(
    msg: Vec<u8>,
    pending: &mut HashMap<u64, Reply>,
    notify: &mpsc::UnboundedSender<Notification>,
    outgoing: &Outgoing,
) -> Result<(), Error> {
    let message = Arc::new(
        String::from_utf8(msg)
            .map_err(|_| Error::Protocol("message from server is not UTF-8".into()))?,
    );
    let envelope: Envelope = serde_json::from_str(&message)
        .map_err(|e| Error::Protocol(format!("invalid JSON from server: {e}")))?;
    match envelope.method.as_deref() {
        Some("echo") => {
            let params = match envelope.params {
                Some(p) => serde_json::from_str(p.get())
                    .map_err(|e| Error::Protocol(format!("echo params: {e}")))?,
                None => json!([]),
            };
            send(
                outgoing,
                &json!({"id": envelope.id, "result": params, "error": null}),
            );
            Ok(())
        }
        Some(method) => {
            if envelope.id.is_null() {
                let _ = notify.send(Notification {
                    method: method.to_owned(),
                    params: raw_part(&message, envelope.params),
                });
            } else {
                // A request we do not serve: say so rather than leave the server waiting.
                send(
                    outgoing,
                    &json!({"id": envelope.id, "result": null, "error": "unknown method"}),
                );
            }
            Ok(())
        }
        None => {
            if envelope.id.as_str() == Some(PROBE_ID) {
                return Ok(());
            }
            let id = envelope.id.as_u64().ok_or_else(|| {
                Error::Protocol(format!("reply with an id we never sent: {}", envelope.id))
            })?;
            let reply = pending
                .remove(&id)
                .ok_or_else(|| Error::Protocol(format!("reply to unknown request {id}")))?;
            let result = if envelope.error.is_null() {
                Ok(raw_part(&message, envelope.result))
            } else {
                Err(rpc_error(&envelope.error))
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

    fn parsed(messages: Vec<Vec<u8>>) -> Vec<Json> {
        messages
            .iter()
            .map(|m| serde_json::from_slice(m).unwrap())
            .collect()
    }

    #[test]
    fn splits_concatenated_and_partial_messages() {
        let mut framer = Framer::default();
        let msgs = framer
            .push(
                br#"{"id":1,"result":[]} {"method":"update2","params":[1]}{"id":2,"res"#,
                1 << 20,
            )
            .unwrap();
        assert_eq!(msgs[1], br#"{"method":"update2","params":[1]}"#);
        assert_eq!(msgs.len(), 2);
        assert_eq!(framer.buf, br#"{"id":2,"res"#);
        let msgs = parsed(framer.push(br#"ult":"a \"}]\\"}"#, 1 << 20).unwrap());
        assert_eq!(msgs, vec![json!({"id": 2, "result": "a \"}]\\"})]);
        assert!(framer.buf.is_empty());
    }

    #[test]
    fn rejects_garbage_and_oversized() {
        assert!(matches!(
            Framer::default().push(b"x{}", 1 << 20),
            Err(Error::Protocol(_))
        ));
        // Framed, then refused when read.
        let (notify, _notifications) = mpsc::unbounded_channel();
        let (outgoing, _sent) = mpsc::unbounded_channel();
        for garbage in [&b"{]"[..], b"{\"a\":}", b"[1]", b"{\"id\":9,\"result\":1}"] {
            let framed = Framer::default().push(garbage, 1 << 20).unwrap();
            assert!(
                matches!(
                    dispatch(framed[0].clone(), &mut HashMap::new(), &notify, &outgoing),
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
    fn replies_and_notifications_keep_their_part_unparsed() {
        let (notify, mut notifications) = mpsc::unbounded_channel();
        let (outgoing, _sent) = mpsc::unbounded_channel();
        let (reply, mut result) = oneshot::channel();
        let mut pending = HashMap::from([(3, reply)]);
        let reply = br#"{"id":3,"result":[true, {"a":1}],"error":null}"#.to_vec();
        dispatch(reply, &mut pending, &notify, &outgoing).unwrap();
        let raw = result.try_recv().unwrap().unwrap();
        assert_eq!(raw.get(), r#"[true, {"a":1}]"#);
        assert_eq!(raw.parse().unwrap(), json!([true, {"a": 1}]));
        let note = br#"{"id":null,"method":"update3","params":["data","t",{}]}"#.to_vec();
        dispatch(note, &mut pending, &notify, &outgoing).unwrap();
        let n = notifications.try_recv().unwrap();
        assert_eq!(
            (n.method.as_str(), n.params.get()),
            ("update3", r#"["data","t",{}]"#)
        );
    }

    #[test]
    fn a_message_split_at_every_byte_is_parsed_once_whole() {
        let text =
            br#" {"id":7,"result":{"t":{"u":{"new":{"s":"x\\\"{[","m":["map",[["k","}"]]]}}}}}"#;
        let mut framer = Framer::default();
        let mut got = Vec::new();
        for b in text {
            got.extend(parsed(framer.push(&[*b], 1 << 20).unwrap()));
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["result"]["t"]["u"]["new"]["s"], "x\\\"{[");
        assert!(framer.buf.is_empty());
    }
}
