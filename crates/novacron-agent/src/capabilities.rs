//! What this host's QEMU can run: its version, machine types (with what
//! each alias stands for) and CPU models, read from `--version`,
//! `-machine help` and `-cpu help`. The server places and migrates a VM only
//! to nodes that offer its machine type and CPU model.

use std::time::Duration;

use novacron_api::QemuCapabilities;

#[derive(Debug, thiserror::Error)]
pub enum CapabilitiesError {
    #[error("Cannot run {program} {arg}")]
    Run {
        program: String,
        arg: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {arg} did not answer within {seconds} s")]
    Timeout { program: String, arg: String, seconds: u64 },
    #[error("{program} {arg} failed: {stderr}")]
    Failed {
        program: String,
        arg: String,
        stderr: String,
    },
    #[error("{program} {arg} printed nothing we recognise: {output:?}")]
    Unrecognised {
        program: String,
        arg: String,
        output: String,
    },
}

const TIMEOUT: Duration = Duration::from_secs(10);

async fn run(qemu: &str, args: &[&str]) -> Result<String, CapabilitiesError> {
    let arg = args.join(" ");
    let out = tokio::process::Command::new(qemu)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(TIMEOUT, out)
        .await
        .map_err(|_| CapabilitiesError::Timeout {
            program: qemu.to_string(),
            arg: arg.clone(),
            seconds: TIMEOUT.as_secs(),
        })?
        .map_err(|source| CapabilitiesError::Run {
            program: qemu.to_string(),
            arg: arg.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(CapabilitiesError::Failed {
            program: qemu.to_string(),
            arg,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub async fn probe(qemu: &str) -> Result<QemuCapabilities, CapabilitiesError> {
    let unrecognised = |arg: &str, output: String| CapabilitiesError::Unrecognised {
        program: qemu.to_string(),
        arg: arg.to_string(),
        output: output.chars().take(200).collect(),
    };
    let version_text = run(qemu, &["--version"]).await?;
    let version = parse_version(&version_text).ok_or_else(|| unrecognised("--version", version_text.clone()))?;
    let machines_text = run(qemu, &["-machine", "help"]).await?;
    let (machine_types, machine_aliases) = parse_machines(&machines_text);
    if machine_types.is_empty() {
        return Err(unrecognised("-machine help", machines_text));
    }
    let cpus_text = run(qemu, &["-cpu", "help"]).await?;
    let cpu_models = parse_cpus(&cpus_text);
    if cpu_models.is_empty() {
        return Err(unrecognised("-cpu help", cpus_text));
    }
    Ok(QemuCapabilities {
        version,
        machine_types,
        machine_aliases,
        cpu_models,
    })
}

/// `QEMU emulator version 10.0.2 (Debian ...)` -> `10.0.2`.
fn parse_version(text: &str) -> Option<String> {
    let rest = text.lines().next()?.split("version ").nth(1)?;
    let v = rest.split_whitespace().next()?;
    v.chars().next()?.is_ascii_digit().then(|| v.to_string())
}

/// Names from `-machine help`, and `alias -> versioned type` from its
/// "(alias of X)" notes.
fn parse_machines(text: &str) -> (Vec<String>, std::collections::BTreeMap<String, String>) {
    let mut names = Vec::new();
    let mut aliases = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .skip_while(|l| !l.starts_with("Supported machines"))
        .skip(1)
    {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if let Some(target) = line.split("(alias of ").nth(1).and_then(|r| r.split(')').next()) {
            aliases.insert(name.to_string(), target.to_string());
        }
        names.push(name.to_string());
    }
    (names, aliases)
}

/// Model names from `-cpu help`: the indented list under "Available CPUs:",
/// up to the first blank line.
fn parse_cpus(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("Available CPUs"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_qemu_10_prints() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"),
            Some("10.0.2".to_string())
        );
        assert_eq!(parse_version("something else"), None);
        let machines = "Supported machines are:\n\
            microvm              microvm (i386)\n\
            pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\n\
            pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)\n\
            pc-i440fx-9.2        Standard PC (i440FX + PIIX, 1996)\n\
            q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\n\
            pc-q35-10.0          Standard PC (Q35 + ICH9, 2009)\n";
        let (names, aliases) = parse_machines(machines);
        assert_eq!(
            names,
            ["microvm", "pc", "pc-i440fx-10.0", "pc-i440fx-9.2", "q35", "pc-q35-10.0"]
        );
        assert_eq!(aliases.get("pc").map(String::as_str), Some("pc-i440fx-10.0"));
        assert_eq!(aliases.get("q35").map(String::as_str), Some("pc-q35-10.0"));
        let cpus = "Available CPUs:\n  486                   (alias configured by machine type)\n  \
            Broadwell-IBRS        (alias of Broadwell-v3)\n  qemu64                (alias configured by machine type)\n\n\
            Recognized CPUID flags:\n  3dnow 3dnowext\n";
        assert_eq!(parse_cpus(cpus), ["486", "Broadwell-IBRS", "qemu64"]);
    }

    #[tokio::test]
    async fn the_installed_qemu_offers_the_defaults() {
        if std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("qemu-system-x86_64 not installed; skipped");
            return;
        }
        let caps = match probe("qemu-system-x86_64").await {
            Ok(c) => c,
            Err(e) => panic!("probe failed: {e}"),
        };
        assert!(
            caps.machine_aliases
                .get("pc")
                .is_some_and(|v| v.starts_with("pc-i440fx-")),
            "{caps:?}"
        );
        assert!(caps.cpu_models.iter().any(|c| c == "qemu64"), "{caps:?}");
        assert!(caps.version.starts_with(|c: char| c.is_ascii_digit()), "{caps:?}");
    }
}
