//! An async QMP (QEMU Machine Protocol) client: line-delimited JSON over a
//! unix socket. Commands carry ids matched to their replies; asynchronous
//! events go to a broadcast channel; every command has a timeout.
//!
//! Every command NovaCron sends is a type in [`commands`] (arguments, name,
//! reply), run with [`Qmp::run`]; the QAPI types they use are in [`types`],
//! checked against QEMU 10.0's schema. A reply that does not match the
//! schema is [`QmpError::UnexpectedReply`], quoting what QEMU said: never a
//! default. Members a reply has beyond the modelled ones are ignored, as the
//! QMP spec asks of clients.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

pub mod commands;
pub mod guest_agent;
#[cfg(test)]
mod real_qemu_tests;
pub mod types;

pub use commands::Command;
use commands::{AnnounceSelf, Cont, QmpCapabilities, QomList, QueryStatus, Quit, Stop, SystemPowerdown, SystemReset};
pub use types::{RunState, StatusInfo};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("Cannot connect to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QMP greeting or reply was malformed: {0}")]
    Protocol(String),
    /// QEMU answered the command with an error.
    #[error("QEMU rejected {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// QEMU's reply does not have the shape its schema gives the command.
    #[error("Unexpected reply to {command}: {reply}")]
    UnexpectedReply {
        command: String,
        /// The reply as QEMU sent it.
        reply: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Cannot encode the arguments of {command}")]
    Arguments {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP command {0} timed out")]
    Timeout(String),
    #[error("QMP connection closed")]
    Closed,
}

/// An asynchronous QMP event (STOP, RESUME, SHUTDOWN, ...).
#[derive(Debug, Clone, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub timestamp: Option<QmpTimestamp>,
}

/// When QEMU emitted an event (its host's wall clock).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct QmpTimestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl QmpEvent {
    /// The event's time in milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> Option<f64> {
        self.timestamp
            .map(|t| t.seconds as f64 * 1e3 + t.microseconds as f64 / 1e3)
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;

pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    timeout: Duration,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let (read, write) = connect_socket(path, timeout).await?.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(timeout, lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))??
            .ok_or(QmpError::Closed)?;
        let greeting: Value = serde_json::from_str(&greeting).map_err(|e| QmpError::Protocol(e.to_string()))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("unexpected greeting {greeting}")));
        }

        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(256);
        let reader = tokio::spawn(read_loop(lines, pending.clone(), events.clone()));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            events,
            timeout,
            reader,
        };
        qmp.run(&QmpCapabilities).await?;
        Ok(qmp)
    }

    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Runs a command and returns its reply, checked against its type.
    pub async fn run<C: Command>(&self, command: &C) -> Result<C::Reply, QmpError> {
        self.run_passing(command, None, self.timeout).await
    }

    /// [`Qmp::run`] with a timeout of its own: for commands that change
    /// the machine (hot-plug), which QEMU may take seconds to answer while
    /// a TCG guest boots.
    pub async fn run_within<C: Command>(&self, command: &C, timeout: Duration) -> Result<C::Reply, QmpError> {
        self.run_passing(command, None, timeout).await
    }

    /// Hands QEMU a file descriptor under `name` (`getfd`), e.g. a socket
    /// the caller bound, so that QEMU listens on exactly that socket: no
    /// port is picked, released and hoped to be free still. QEMU keeps its
    /// own copy; the caller may close `fd` afterwards.
    pub async fn pass_fd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let getfd = commands::GetFd { fdname: name.into() };
        self.run_passing(&getfd, Some(fd), self.timeout).await.map(drop)
    }

    async fn run_passing<C: Command>(
        &self,
        command: &C,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<C::Reply, QmpError> {
        let arguments = match serde_json::to_value(command) {
            Ok(Value::Null) => None,
            Ok(args) => Some(args),
            Err(source) => {
                return Err(QmpError::Arguments {
                    command: C::NAME.to_string(),
                    source,
                })
            }
        };
        let reply = self.execute_passing(C::NAME, arguments, fd, timeout).await?;
        parse_reply::<C::Reply>(C::NAME, reply)
    }

    /// Runs a command and returns its `return` value as QEMU sent it.
    /// For tests only: callers use the typed [`Qmp::run`].
    #[cfg(test)]
    pub(crate) async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_passing(command, arguments, None, self.timeout).await
    }

    async fn execute_passing(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        let write = async {
            let mut w = self.writer.lock().await;
            let sent = match fd {
                Some(fd) => send_with_fd(w.as_ref(), line.as_bytes(), fd).await?,
                None => 0,
            };
            w.write_all(&line.as_bytes()[sent..]).await
        };
        if let Err(e) = write.await {
            self.pending.lock().remove(&id);
            return Err(e.into());
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                self.pending.lock().remove(&id);
                Err(QmpError::Timeout(command.to_string()))
            }
            Ok(Err(_)) => Err(QmpError::Closed),
            Ok(Ok(reply)) => reply.map_err(|e| match e {
                QmpError::Command { class, desc, .. } => QmpError::Command {
                    command: command.to_string(),
                    class,
                    desc,
                },
                other => other,
            }),
        }
    }

    /// The guest's run state.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.run(&QueryStatus).await
    }

    /// Pauses the vCPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.run(&Stop).await.map(drop)
    }

    /// Resumes the vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.run(&Cont).await.map(drop)
    }

    /// Announces the guest's NICs on the network at once and three more
    /// times 50, 150 and 250 ms later (after a migration: the new host).
    pub async fn announce_self(&self) -> Result<(), QmpError> {
        let announce = AnnounceSelf {
            initial: 0,
            max: 250,
            rounds: 4,
            step: 100,
        };
        self.run(&announce).await.map(drop)
    }

    /// Ids of the devices that have one (`-device id=...`, `device_add`).
    pub async fn device_ids(&self) -> Result<Vec<String>, QmpError> {
        let props = self
            .run(&QomList {
                path: "/machine/peripheral".into(),
            })
            .await?;
        Ok(props
            .into_iter()
            .filter(|p| p.kind.starts_with("child<"))
            .map(|p| p.name)
            .collect())
    }

    /// Presses the ACPI power button.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.run(&SystemPowerdown).await.map(drop)
    }

    /// Hard reset of the guest.
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.run(&SystemReset).await.map(drop)
    }

    /// Asks QEMU to exit. The connection closes as QEMU goes away, so a
    /// closed connection counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.run(&Quit).await {
            Ok(_) | Err(QmpError::Closed) | Err(QmpError::Io(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Sends the start of `bytes` with `fd` attached (SCM_RIGHTS); returns how
/// many bytes went (at least one, which carries the descriptor).
async fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd.as_raw_fd()];
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(bytes)];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(std::io::Error::from)
        });
        match sent {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A command's `return` value as its reply type, or the error that quotes it.
/// Connects to a QEMU unix socket (QMP, guest agent) within `timeout`.
async fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream, QmpError> {
    tokio::time::timeout(timeout, UnixStream::connect(path))
        .await
        .map_err(|_| QmpError::Timeout("connect".into()))?
        .map_err(|source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        })
}

fn parse_reply<R: serde::de::DeserializeOwned>(command: &str, reply: Value) -> Result<R, QmpError> {
    R::deserialize(&reply).map_err(|source| QmpError::UnexpectedReply {
        command: command.to_string(),
        reply: reply.to_string(),
        source,
    })
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
) {
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => break,
        };
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(line, "unparseable QMP message");
            continue;
        };
        if msg.get("event").is_some() {
            if let Ok(ev) = serde_json::from_value::<QmpEvent>(msg) {
                let _ = events.send(ev);
            }
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let Some(tx) = pending.lock().remove(&id) else {
            continue;
        };
        let reply = if let Some(ret) = msg.get("return") {
            Ok(ret.clone())
        } else if let Some(err) = msg.get("error") {
            Err(QmpError::Command {
                command: String::new(),
                class: err["class"].as_str().unwrap_or("GenericError").to_string(),
                desc: err["desc"].as_str().unwrap_or_default().to_string(),
            })
        } else {
            Err(QmpError::Protocol(format!("reply without return or error: {msg}")))
        };
        let _ = tx.send(reply);
    }
    // Connection gone: wake every waiter with Closed.
    pending.lock().clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QMP server: greeting, then answers by command name.
    async fn fake_server(path: &Path) {
        let listener = UnixListener::bind(path).expect("bind");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (r, mut w) = stream.into_split();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .expect("greet");
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let msg: Value = serde_json::from_str(&line).expect("json");
                let id = msg["id"].clone();
                let reply = match msg["execute"].as_str() {
                    Some("query-status") => {
                        w.write_all(b"{\"event\": \"STOP\", \"data\": {}}\n")
                            .await
                            .expect("event");
                        json!({"return": {"running": false, "status": "paused", "singlestep": false}, "id": id})
                    }
                    // A reply of a shape QEMU's schema does not allow.
                    Some("query-migrate") => json!({"return": {"status": "warp-speed"}, "id": id}),
                    Some("hang") => continue,
                    Some("qmp_capabilities") => json!({"return": {}, "id": id}),
                    _ => json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": id}),
                };
                w.write_all(format!("{reply}\n").as_bytes()).await.expect("reply");
            }
        });
    }

    #[tokio::test]
    async fn commands_replies_events_and_timeouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        fake_server(&path).await;
        let qmp = Qmp::connect(&path, Duration::from_millis(500)).await.expect("connect");
        let mut events = qmp.events();
        let st = qmp.query_status().await.expect("status");
        assert_eq!(st.status, RunState::Paused);
        assert!(!st.running);
        let ev = events.recv().await.expect("event");
        assert_eq!(ev.event, "STOP");
        match qmp.execute("bogus", None).await {
            Err(QmpError::Command { command, class, .. }) => {
                assert_eq!(command, "bogus");
                assert_eq!(class, "CommandNotFound");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(qmp.execute("hang", None).await, Err(QmpError::Timeout(_))));
    }

    #[tokio::test]
    async fn a_reply_of_the_wrong_shape_fails_the_command_quoting_qemu() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        fake_server(&path).await;
        let qmp = Qmp::connect(&path, Duration::from_millis(500)).await.expect("connect");
        let err = qmp.run(&commands::QueryMigrate).await.expect_err("unknown status");
        match &err {
            QmpError::UnexpectedReply { command, reply, .. } => {
                assert_eq!(command, "query-migrate");
                assert!(reply.contains("warp-speed"), "{reply}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            r#"Unexpected reply to query-migrate: {"status":"warp-speed"}"#
        );
        let source = std::error::Error::source(&err)
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(source.contains("unknown variant `warp-speed`"), "{source}");
        // The connection is fine afterwards.
        assert_eq!(qmp.query_status().await.expect("status").status, RunState::Paused);
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let err = Qmp::connect(Path::new("/nonexistent/qmp.sock"), Duration::from_secs(1)).await;
        assert!(matches!(err, Err(QmpError::Connect { .. })));
    }
}
