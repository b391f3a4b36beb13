//! What this host's QEMU can run: its version, machine types (with what
//! each alias stands for) and the CPU models that run under the chosen
//! accelerator on this host, asked of a QEMU over QMP (`query-version`,
//! `query-machines`, `query-cpu-definitions`). The server places and
//! migrates a VM only to nodes that offer its machine type and CPU model.
//!
//! A model with unavailable features is left out: QEMU would start it
//! without them (TCG cannot emulate AVX-512, a host CPU may lack a flag), so
//! the guest would see a different CPU than on the node it came from.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use novacron_api::QemuCapabilities;
use novacron_qmp::commands::{QueryCpuDefinitions, QueryMachines, QueryVersion};
use novacron_qmp::{Qmp, QmpError};

#[derive(Debug, thiserror::Error)]
pub enum CapabilitiesError {
    #[error("Cannot run {program}")]
    Run {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} exited before it answered on QMP: {stderr}")]
    Exited { program: String, stderr: String },
    #[error("{program} did not answer on QMP within {seconds} s")]
    Timeout { program: String, seconds: u64 },
    #[error("Asking {program} what it offers failed")]
    Qmp {
        program: String,
        #[source]
        source: QmpError,
    },
    #[error("{program} offers no {what}")]
    Nothing { program: String, what: &'static str },
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Starts a QEMU without a guest (`-machine none`) under `accel` and asks it.
pub async fn probe(qemu: &str, accel: &str, work_dir: &Path) -> Result<QemuCapabilities, CapabilitiesError> {
    let socket = work_dir.join("capabilities-probe.qmp");
    let _ = std::fs::remove_file(&socket);
    let mut child = tokio::process::Command::new(qemu)
        .args(["-machine", "none", "-accel", accel])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CapabilitiesError::Run {
            program: qemu.to_string(),
            source,
        })?;
    let asked = async {
        let qmp = connect(qemu, &mut child, &socket).await?;
        let result = ask(qemu, &qmp).await;
        let _ = qmp.quit().await;
        result
    }
    .await;
    // kill_on_drop ends a QEMU that did not quit; reap it either way.
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = std::fs::remove_file(&socket);
    asked
}

/// Connects once QEMU has created its socket; fails if QEMU exits first.
async fn connect(qemu: &str, child: &mut tokio::process::Child, socket: &Path) -> Result<Qmp, CapabilitiesError> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = err.read_to_string(&mut stderr).await;
            }
            return Err(CapabilitiesError::Exited {
                program: qemu.to_string(),
                stderr: stderr.trim().to_string(),
            });
        }
        if socket.exists() {
            if let Ok(qmp) = Qmp::connect(socket, TIMEOUT).await {
                return Ok(qmp);
            }
        }
        if Instant::now() > deadline {
            return Err(CapabilitiesError::Timeout {
                program: qemu.to_string(),
                seconds: TIMEOUT.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ask(qemu: &str, qmp: &Qmp) -> Result<QemuCapabilities, CapabilitiesError> {
    let qmp_err = |source| CapabilitiesError::Qmp {
        program: qemu.to_string(),
        source,
    };
    let nothing = |what| CapabilitiesError::Nothing {
        program: qemu.to_string(),
        what,
    };
    let version = qmp.run(&QueryVersion).await.map_err(qmp_err)?;
    let machines = qmp.run(&QueryMachines).await.map_err(qmp_err)?;
    let cpus = qmp.run(&QueryCpuDefinitions).await.map_err(qmp_err)?;
    let mut caps = QemuCapabilities {
        version: version.qemu.to_string(),
        ..Default::default()
    };
    for m in machines {
        if let Some(alias) = m.alias {
            caps.machine_aliases.insert(alias.clone(), m.name.clone());
            caps.machine_types.push(alias);
        }
        caps.machine_types.push(m.name);
    }
    caps.machine_types.sort();
    caps.cpu_models = cpus
        .into_iter()
        .filter(|c| c.unavailable_features.as_ref().is_none_or(Vec::is_empty))
        .map(|c| c.name)
        .collect();
    caps.cpu_models.sort();
    if caps.machine_types.is_empty() {
        return Err(nothing("machine type"));
    }
    if caps.cpu_models.is_empty() {
        return Err(nothing("CPU model that runs here"));
    }
    Ok(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_installed() -> bool {
        let found = std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            eprintln!("qemu-system-x86_64 not installed; skipped");
        }
        found
    }

    #[tokio::test]
    async fn under_tcg_the_installed_qemu_offers_the_defaults_and_only_models_that_run() {
        if !qemu_installed() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let caps = match probe("qemu-system-x86_64", "tcg", dir.path()).await {
            Ok(c) => c,
            Err(e) => panic!("probe failed: {e}"),
        };
        assert!(
            caps.machine_aliases
                .get("pc")
                .is_some_and(|v| v.starts_with("pc-i440fx-")),
            "{caps:?}"
        );
        assert!(caps.machine_types.iter().any(|m| m == "q35"), "{caps:?}");
        assert!(caps.cpu_models.iter().any(|c| c == "qemu64"), "{caps:?}");
        // TCG cannot emulate AVX-512: a model that needs it is not offered.
        assert!(!caps.cpu_models.iter().any(|c| c == "Skylake-Server"), "{caps:?}");
        assert!(caps.version.starts_with(|c: char| c.is_ascii_digit()), "{caps:?}");
        assert!(!dir.path().join("capabilities-probe.qmp").exists());
    }

    #[tokio::test]
    async fn a_qemu_that_will_not_start_is_an_error_quoting_it() {
        if !qemu_installed() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let err = probe("qemu-system-x86_64", "no-such-accel", dir.path())
            .await
            .expect_err("an unknown accelerator");
        assert!(matches!(err, CapabilitiesError::Exited { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-accel"), "{err}");
    }
}
