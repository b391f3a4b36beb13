//! Where the CLI finds the server and its token: flags and environment
//! (`NOVACRON_SERVER`, `NOVACRON_TOKEN`), then `~/.config/novacron/config.json`,
//! then the local dev cluster's data directory.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const DEFAULT_DEV_PORT: u16 = 8420;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ConfigFile {
    pub server: Option<String>,
    pub token: Option<String>,
    /// CA certificate file for an https:// server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

pub fn config_path() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".config"))
        .join("novacron/config.json")
}

/// Default data directory of `novacron dev`.
pub fn default_dev_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".local/share"))
        .join("novacron/dev")
}

/// Writes the config file (mode 0600: it holds a token).
pub fn save(file: &ConfigFile) -> Result<()> {
    let path = config_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    }
    novacron_tls::write_private(&path, &serde_json::to_string_pretty(file)?)?;
    Ok(())
}

pub struct Target {
    pub server: String,
    pub token: String,
    pub ca_cert: Option<PathBuf>,
}

impl Target {
    /// TLS settings trusting the CA file, if one is given (else the system roots apply).
    pub fn tls(&self) -> Result<Option<novacron_tls::rustls::ClientConfig>> {
        let Some(path) = &self.ca_cert else {
            return Ok(None);
        };
        let ca = std::fs::read_to_string(path)
            .with_context(|| format!("Cannot read the CA certificate {}", path.display()))?;
        Ok(Some(novacron_tls::client_config(&ca, None)?))
    }

    /// An API client for this target.
    pub fn client(&self) -> Result<novacron_client::Client> {
        Ok(novacron_client::Client::with_tls(
            &self.server,
            &self.token,
            self.tls()?,
        )?)
    }
}

pub fn resolve(
    server: Option<String>,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
    dev_dir: Option<PathBuf>,
) -> Result<Target> {
    let file: ConfigFile = match std::fs::read(config_path()) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("Invalid config file {}", config_path().display()))?,
        Err(_) => ConfigFile::default(),
    };
    let dev_dir = dev_dir.unwrap_or_else(default_dev_dir);
    let dev_url = std::fs::read_to_string(dev_dir.join("server.url"))
        .ok()
        .map(|s| s.trim().to_string());
    let dev_token = std::fs::read_to_string(dev_dir.join("server/admin.token"))
        .ok()
        .map(|s| s.trim().to_string());
    let server = server
        .or(file.server)
        .or(dev_url)
        .unwrap_or_else(|| format!("https://127.0.0.1:{DEFAULT_DEV_PORT}"));
    let Some(token) = token.or(file.token).or(dev_token) else {
        bail!(
            "No API token: set NOVACRON_TOKEN, pass --token, put it in {}, or start a dev cluster with `novacron dev`",
            config_path().display()
        );
    };
    // A dev cluster's CLI trusts the dev cluster's CA.
    let dev_ca = Some(dev_dir.join("server/pki/ca.crt")).filter(|p| p.exists() && server.starts_with("https://"));
    Ok(Target {
        server,
        token,
        ca_cert: ca_cert.or(file.ca_cert).or(dev_ca),
    })
}
