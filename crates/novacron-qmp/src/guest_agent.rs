//! A client of the QEMU guest agent (qemu-ga) inside a VM, reached over the
//! virtio-serial port QEMU exposes as a unix socket.
//!
//! The protocol is QMP's JSON without greeting or capabilities, and without
//! reply ids: commands are answered in order, one at a time. Whatever an
//! earlier client left unread is discarded by `guest-sync-delimited`, whose
//! reply is preceded by a 0xFF byte; every session starts with it.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::commands::no_args;

use crate::commands::Command;
use crate::QmpError;

/// One connection to a guest agent.
pub struct GuestAgent {
    stream: BufReader<UnixStream>,
    timeout: Duration,
}

impl GuestAgent {
    /// Connects and synchronises; fails with a timeout when no agent runs
    /// in the guest (QEMU accepts the connection regardless).
    pub async fn connect(path: &Path, timeout: Duration) -> Result<GuestAgent, QmpError> {
        let stream = crate::connect_socket(path, timeout).await?;
        let mut agent = GuestAgent {
            stream: BufReader::new(stream),
            timeout,
        };
        agent.sync().await?;
        Ok(agent)
    }

    async fn sync(&mut self) -> Result<(), QmpError> {
        let id = u64::from(std::process::id()) << 20 | u64::from(rand_u16());
        // 0xFF first: an agent part-way through a broken message starts over.
        let mut msg = vec![0xFF];
        msg.extend(
            json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } })
                .to_string()
                .bytes(),
        );
        msg.push(b'\n');
        self.stream.get_mut().write_all(&msg).await?;
        let read = async {
            loop {
                // Skip to the delimiter, then the reply follows on its line.
                let mut skipped = Vec::new();
                if self.stream.read_until(0xFF, &mut skipped).await? == 0 {
                    return Err(QmpError::Closed);
                }
                let mut line = String::new();
                if self.stream.read_line(&mut line).await? == 0 {
                    return Err(QmpError::Closed);
                }
                let reply: Value = match serde_json::from_str(line.trim()) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                if reply.get("return").and_then(Value::as_u64) == Some(id) {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| QmpError::Timeout("guest-sync-delimited".into()))?
    }

    /// Runs a command and returns its reply, checked against its type.
    pub async fn run<C: Command>(&mut self, command: &C) -> Result<C::Reply, QmpError> {
        let reply = self.execute(C::NAME, command, true).await?;
        crate::parse_reply(C::NAME, reply)
    }

    /// Sends a command that does not answer when it succeeds
    /// (`guest-shutdown`): only a prompt error is reported.
    pub async fn send<C: Command>(&mut self, command: &C) -> Result<(), QmpError> {
        self.execute(C::NAME, command, false).await.map(drop)
    }

    async fn execute<C: Command>(&mut self, name: &str, command: &C, wait: bool) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": name });
        match serde_json::to_value(command) {
            Ok(Value::Null) => {}
            Ok(args) => msg["arguments"] = args,
            Err(source) => {
                return Err(QmpError::Arguments {
                    command: name.to_string(),
                    source,
                })
            }
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.stream.get_mut().write_all(line.as_bytes()).await?;
        let timeout = if wait { self.timeout } else { Duration::from_millis(500) };
        let mut reply = String::new();
        match tokio::time::timeout(timeout, self.stream.read_line(&mut reply)).await {
            Err(_) if !wait => return Ok(Value::Null),
            Err(_) => return Err(QmpError::Timeout(name.to_string())),
            Ok(Ok(0)) => return Err(QmpError::Closed),
            Ok(r) => r?,
        };
        let reply: Value = serde_json::from_str(reply.trim()).map_err(|e| QmpError::Protocol(e.to_string()))?;
        if let Some(err) = reply.get("error") {
            let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            return Err(QmpError::Command {
                command: name.to_string(),
                class: field("class"),
                desc: field("desc"),
            });
        }
        reply
            .get("return")
            .cloned()
            .ok_or_else(|| QmpError::Protocol(format!("reply to {name} without return: {reply}")))
    }
}

no_args! {
    GetOsInfo = "guest-get-osinfo" -> OsInfo;
    GetHostName = "guest-get-host-name" -> HostName;
    NetworkGetInterfaces = "guest-network-get-interfaces" -> Vec<GuestInterface>;
    /// Powerdown: the agent asks the guest OS to shut down.
    Shutdown = "guest-shutdown" -> Value;
    /// Flushes and freezes the guest's filesystems; how many it froze.
    FsfreezeFreeze = "guest-fsfreeze-freeze" -> u64;
    /// Thaws them; how many it thawed.
    FsfreezeThaw = "guest-fsfreeze-thaw" -> u64;
}

/// Not for security: only tells this session's sync reply from stale ones.
fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos ^ (nanos >> 16)) as u16
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OsInfo {
    #[serde(default)]
    pub pretty_name: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub kernel_release: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HostName {
    #[serde(rename = "host-name")]
    pub host_name: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GuestInterface {
    pub name: String,
    #[serde(rename = "hardware-address", default)]
    pub hardware_address: Option<String>,
    #[serde(rename = "ip-addresses", default)]
    pub ip_addresses: Vec<GuestIpAddress>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GuestIpAddress {
    #[serde(rename = "ip-address")]
    pub ip_address: String,
    pub prefix: u8,
}

/// `guest-exec`: starts a program in the guest, output captured.
#[derive(Debug, Clone, Serialize)]
pub struct Exec {
    pub path: String,
    pub arg: Vec<String>,
    #[serde(rename = "capture-output")]
    pub capture_output: bool,
}
impl Command for Exec {
    const NAME: &'static str = "guest-exec";
    type Reply = ExecStarted;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ExecStarted {
    pub pid: i64,
}

/// `guest-exec-status`
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ExecStatus {
    pub pid: i64,
}
impl Command for ExecStatus {
    const NAME: &'static str = "guest-exec-status";
    type Reply = ExecResult;
}

/// What `guest-exec-status` says; output is base64, as the agent sends it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ExecResult {
    pub exited: bool,
    #[serde(default)]
    pub exitcode: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(rename = "out-data", default)]
    pub out_data: Option<String>,
    #[serde(rename = "err-data", default)]
    pub err_data: Option<String>,
    #[serde(rename = "out-truncated", default)]
    pub out_truncated: bool,
    #[serde(rename = "err-truncated", default)]
    pub err_truncated: bool,
}
