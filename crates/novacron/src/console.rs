//! `novacron vm console`: the serial console over the server's WebSocket.
//! On a terminal the local tty goes into raw mode and Ctrl-] detaches; with
//! piped stdin the bytes are forwarded as they are (useful for scripts).

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;

use anyhow::{Context, Result};
use futures::{SinkExt, StreamExt};
use nix::sys::termios::{self, SetArg, Termios};
use novacron_client::Client;
use novacron_tls::rustls;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const DETACH: u8 = 0x1d; // Ctrl-]

/// Restores the terminal when dropped.
struct RawMode(Option<Termios>);

impl RawMode {
    fn enable() -> Self {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawMode(None);
        }
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}

pub async fn attach(c: &Client, tls: Option<std::sync::Arc<rustls::ClientConfig>>, name: &str) -> Result<()> {
    let http_url = format!("{}/v1/vms/{name}/console", c.base_url());
    let stream = novacron_tls::connect_url(&reqwest::Url::parse(&http_url)?, tls)
        .await
        .with_context(|| format!("Cannot connect to {}", c.base_url()))?;
    let mut req = http_url.replacen("http", "ws", 1).as_str().into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", c.token()).parse()?);
    let (ws, _) = match tokio_tungstenite::client_async(req, stream).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            let msg = serde_json::from_str::<novacron_api::ErrorBody>(&body)
                .map(|b| b.error.message)
                .unwrap_or(body);
            anyhow::bail!("{msg} ({})", resp.status());
        }
        Err(e) => return Err(e).context("Cannot open the console"),
    };
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("Connected to {name}'s serial console. Detach with Ctrl-].\r");
    }
    let raw = RawMode::enable();
    let (mut tx, mut rx) = ws.split();
    let input = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    // Piped input ended: keep reading output a moment, then leave.
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    break;
                }
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            if interactive {
                if let Some(pos) = chunk.iter().position(|b| *b == DETACH) {
                    if pos > 0 {
                        let _ = tx
                            .send(Message::Binary(bytes::Bytes::copy_from_slice(&chunk[..pos])))
                            .await;
                    }
                    break;
                }
            }
            if tx
                .send(Message::Binary(bytes::Bytes::copy_from_slice(chunk)))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = tx.close().await;
    };
    let output = async {
        let mut stdout = std::io::stdout();
        while let Some(Ok(msg)) = rx.next().await {
            let data = match msg {
                Message::Binary(b) => b.to_vec(),
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            if stdout.write_all(&data).and_then(|_| stdout.flush()).is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = input => {}
        _ = output => {}
    }
    drop(raw);
    if interactive {
        eprintln!("\r\nDetached from {name}.");
    }
    Ok(())
}
