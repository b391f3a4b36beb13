//! CLI for identity: login, whoami, users, tokens, roles, projects and the audit log.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use novacron_api::units::{format_mib, parse_mib};
use novacron_api::{
    AuditRecord, AuditVerification, CreateProject, CreateRole, CreateToken, CreateUser, IssuedToken, List, Login,
    Project, Quota, Role, RoleBinding, Token, TotpEnrollment, UpdateProject, User,
};
use serde_json::Value;

use crate::commands::client;
use crate::output::{self, age, Format};
use crate::{config, parse_duration, Global};

#[derive(Args)]
pub struct LoginArgs {
    #[arg(long)]
    pub user: String,
    /// Project to act in (default: the user's only one).
    #[arg(long)]
    pub project: Option<String>,
    /// Token lifetime, e.g. 12h (default 12h).
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Read the password from the first line of stdin instead of prompting.
    #[arg(long)]
    pub password_stdin: bool,
    /// Current TOTP code, for users with a second factor.
    #[arg(long)]
    pub totp: Option<String>,
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a user; the password is read from stdin (or prompted).
    Create {
        name: String,
        /// ROLE or ROLE@PROJECT (repeatable); ROLE alone means every project.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
    },
    List,
    Get {
        name: String,
    },
    /// Delete a user and revoke their tokens.
    Delete {
        name: String,
    },
    /// Turn on the TOTP second factor; prints the secret once.
    Totp {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token (prints the secret once).
    Create {
        name: String,
        #[arg(long, required_unless_present = "join")]
        role: Option<String>,
        /// A one-time token for an agent to join the cluster (`novacron agent --join-token`).
        #[arg(long, conflicts_with_all = ["role", "project"])]
        join: bool,
        #[arg(long)]
        project: Option<String>,
        /// Lifetime, e.g. 30d, 12h.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    List,
    Revoke {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum RoleCommand {
    List,
    Get {
        name: String,
    },
    /// Create a custom role, e.g. --allow vms:read,vms:update,migrations:*
    Create {
        name: String,
        #[arg(long, value_delimiter = ',', required = true)]
        allow: Vec<String>,
    },
    Delete {
        name: String,
    },
}

#[derive(Args)]
pub struct QuotaArgs {
    #[arg(long)]
    pub vcpus: Option<u64>,
    /// e.g. 64GiB
    #[arg(long, value_parser = parse_mib)]
    pub memory: Option<u64>,
    /// Root and data disks and volumes, e.g. 1TiB
    #[arg(long, value_parser = parse_mib)]
    pub disk: Option<u64>,
    #[arg(long)]
    pub vms: Option<u64>,
    #[arg(long)]
    pub networks: Option<u64>,
    /// Addresses taken by NICs.
    #[arg(long)]
    pub addresses: Option<u64>,
}

impl QuotaArgs {
    fn quota(&self) -> Quota {
        Quota {
            vcpus: self.vcpus,
            memory_mib: self.memory,
            disk_mib: self.disk,
            vms: self.vms,
            networks: self.networks,
            addresses: self.addresses,
        }
    }
}

#[derive(Subcommand)]
pub enum ProjectCommand {
    List,
    Get {
        name: String,
    },
    Create {
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// Replace a project's quota (absent limits become unlimited).
    SetQuota {
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Audit records, oldest first.
    List {
        /// A time (RFC 3339) or an age such as 30m, 2h, 7d.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        project: Option<String>,
    },
    /// Check the hash chain; exits non-zero when a record was changed, reordered or deleted.
    Verify,
}

fn read_password(prompt: &str) -> Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("{prompt}");
        std::io::stderr().flush()?;
        // Turn echo off while the password is typed.
        let saved = nix::sys::termios::tcgetattr(&stdin).ok();
        if let Some(mut t) = saved.clone() {
            t.local_flags.remove(nix::sys::termios::LocalFlags::ECHO);
            let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &t);
        }
        let mut line = String::new();
        let read = stdin.lock().read_line(&mut line);
        if let Some(t) = saved {
            let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &t);
        }
        eprintln!();
        read?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    } else {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("Cannot read the password from stdin")?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}

/// `novacron login`: exchanges credentials for a token and saves it with the
/// server URL in the CLI config file.
pub async fn login(g: &Global, a: LoginArgs) -> Result<()> {
    let password = if a.password_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        read_password(&format!("Password for {}: ", a.user))?
    };
    // Where to log in: the usual server resolution, without a token.
    let target = config::resolve(
        g.server.clone(),
        Some(String::new()),
        g.ca_cert.clone(),
        g.dev_dir.clone(),
    )?;
    let server = target.server.clone();
    let c = target.client()?;
    let issued: IssuedToken = c
        .post_json(
            "login",
            &Login {
                user: a.user.clone(),
                password,
                totp: a.totp,
                project: a.project,
                ttl_s: a.ttl.map(|d| d.as_secs()),
            },
        )
        .await?;
    config::save(&config::ConfigFile {
        server: Some(server.clone()),
        token: Some(issued.secret.clone()),
        ca_cert: target.ca_cert.as_ref().and_then(|p| std::path::absolute(p).ok()),
    })?;
    match g.output {
        Format::Table => println!(
            "Logged in to {server} as {} ({} in {}), token {} expires {}; saved to {}",
            a.user,
            issued.token.role,
            issued.token.project.as_deref().unwrap_or("all projects"),
            issued.token.metadata.name,
            issued
                .token
                .expires_at
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "never".into()),
            config::config_path().display()
        ),
        f => output::print_data(f, &issued.token)?,
    }
    Ok(())
}

pub async fn whoami(g: &Global) -> Result<()> {
    let me: Value = client(g)?.get_json("whoami").await?;
    match g.output {
        Format::Table => {
            println!("actor:    {}", me["actor"].as_str().unwrap_or_default());
            println!("token:    {}", me["token"].as_str().unwrap_or_default());
            println!("role:     {}", me["role"].as_str().unwrap_or_default());
            println!("project:  {}", me["project"].as_str().unwrap_or("(all projects)"));
            let perms: Vec<&str> = me["permissions"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            println!("can:      {}", perms.join(" "));
            Ok(())
        }
        f => output::print_data(f, &me),
    }
}

fn parse_binding(s: &str) -> RoleBinding {
    match s.split_once('@') {
        Some((role, project)) if project != "*" => RoleBinding {
            role: role.into(),
            project: Some(project.into()),
        },
        Some((role, _)) => RoleBinding {
            role: role.into(),
            project: None,
        },
        None => RoleBinding {
            role: s.into(),
            project: None,
        },
    }
}

fn bindings(u: &User) -> String {
    u.bindings.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",")
}

pub async fn user(g: &Global, cmd: UserCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        UserCommand::Create { name, roles } => {
            let password = read_password(&format!("Password for {name}: "))?;
            let u: User = c
                .post_json(
                    "users",
                    &CreateUser {
                        name,
                        password,
                        bindings: roles.iter().map(|r| parse_binding(r)).collect(),
                    },
                )
                .await?;
            println!("user {} created ({})", u.metadata.name, bindings(&u));
            Ok(())
        }
        UserCommand::List => {
            let list: List<User> = c.get_json("users").await?;
            print_rows(g.output, &list.items, &["NAME", "ROLES", "TOTP", "AGE"], |u| {
                vec![
                    u.metadata.name.clone(),
                    bindings(u),
                    if u.totp_enabled { "on" } else { "off" }.into(),
                    age(u.metadata.created_at),
                ]
            })
        }
        UserCommand::Get { name } => output::print_data(g.output, &c.get_json::<User>(&format!("users/{name}")).await?),
        UserCommand::Delete { name } => {
            c.delete_path(&format!("users/{name}")).await?;
            println!("user {name} deleted");
            Ok(())
        }
        UserCommand::Totp { name } => {
            let e: TotpEnrollment = c.post_json(&format!("users/{name}/totp"), &Value::Null).await?;
            match g.output {
                Format::Table => println!("TOTP enabled for {name}.\nsecret: {}\nuri:    {}", e.secret, e.uri),
                f => output::print_data(f, &e)?,
            }
            Ok(())
        }
    }
}

pub async fn token(g: &Global, cmd: TokenCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        TokenCommand::Create {
            name,
            role,
            join,
            project,
            ttl,
        } => {
            let issued: IssuedToken = c
                .post_json(
                    "tokens",
                    &CreateToken {
                        name,
                        role: role.unwrap_or_else(|| "join".into()),
                        project,
                        ttl_s: ttl.map(|d| d.as_secs()),
                        join,
                    },
                )
                .await?;
            match g.output {
                // The secret alone on stdout, so it can be captured.
                Format::Table => println!("{}", issued.secret),
                f => output::print_data(f, &issued)?,
            }
            Ok(())
        }
        TokenCommand::List => {
            let list: List<Token> = c.get_json("tokens").await?;
            print_rows(
                g.output,
                &list.items,
                &["NAME", "USER", "ROLE", "PROJECT", "EXPIRES", "STATE"],
                |t| {
                    vec![
                        t.metadata.name.clone(),
                        t.user.clone().unwrap_or_else(|| "-".into()),
                        t.role.clone(),
                        t.project.clone().unwrap_or_else(|| "*".into()),
                        t.expires_at.map(|e| e.to_rfc3339()).unwrap_or_else(|| "never".into()),
                        if t.revoked_at.is_some() {
                            "revoked"
                        } else if t.expires_at.is_some_and(|e| e <= chrono::Utc::now()) {
                            "expired"
                        } else {
                            "active"
                        }
                        .into(),
                    ]
                },
            )
        }
        TokenCommand::Revoke { name } => {
            c.delete_path(&format!("tokens/{name}")).await?;
            println!("token {name} revoked");
            Ok(())
        }
    }
}

pub async fn role(g: &Global, cmd: RoleCommand) -> Result<()> {
    let c = client(g)?;
    let perms = |r: &Role| {
        r.permissions
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    match cmd {
        RoleCommand::List => {
            let list: List<Role> = c.get_json("roles").await?;
            print_rows(g.output, &list.items, &["NAME", "BUILTIN", "PERMISSIONS"], |r| {
                vec![r.metadata.name.clone(), r.builtin.to_string(), perms(r)]
            })
        }
        RoleCommand::Get { name } => output::print_data(g.output, &c.get_json::<Role>(&format!("roles/{name}")).await?),
        RoleCommand::Create { name, allow } => {
            let r: Role = c
                .post_json(
                    "roles",
                    &CreateRole {
                        name,
                        permissions: allow,
                    },
                )
                .await?;
            println!("role {} created: {}", r.metadata.name, perms(&r));
            Ok(())
        }
        RoleCommand::Delete { name } => {
            c.delete_path(&format!("roles/{name}")).await?;
            println!("role {name} deleted");
            Ok(())
        }
    }
}

fn limit(used: u64, limit: Option<u64>, fmt: fn(u64) -> String) -> String {
    match limit {
        Some(l) => format!("{}/{}", fmt(used), fmt(l)),
        None => format!("{}/-", fmt(used)),
    }
}

fn project_row(p: &Project) -> Vec<String> {
    let plain = |n: u64| n.to_string();
    vec![
        p.metadata.name.clone(),
        limit(p.usage.vms, p.quota.vms, plain),
        limit(p.usage.vcpus, p.quota.vcpus, plain),
        limit(p.usage.memory_mib, p.quota.memory_mib, format_mib),
        limit(p.usage.disk_mib, p.quota.disk_mib, format_mib),
    ]
}

const PROJECT_HEADER: [&str; 5] = ["NAME", "VMS", "VCPUS", "MEMORY", "DISK"];

pub async fn project(g: &Global, cmd: ProjectCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        ProjectCommand::List => {
            let list: List<Project> = c.get_json("projects").await?;
            print_rows(g.output, &list.items, &PROJECT_HEADER, project_row)
        }
        ProjectCommand::Get { name } => {
            let p: Project = c.get_json(&format!("projects/{name}")).await?;
            print_rows(g.output, std::slice::from_ref(&p), &PROJECT_HEADER, project_row)
        }
        ProjectCommand::Create { name, quota } => {
            let p: Project = c
                .post_json(
                    "projects",
                    &CreateProject {
                        name,
                        quota: quota.quota(),
                    },
                )
                .await?;
            println!("project {} created", p.metadata.name);
            Ok(())
        }
        ProjectCommand::SetQuota { name, quota } => {
            let p: Project = c
                .put_json(&format!("projects/{name}"), &UpdateProject { quota: quota.quota() })
                .await?;
            println!("quota of {} set", p.metadata.name);
            Ok(())
        }
        ProjectCommand::Delete { name } => {
            c.delete_path(&format!("projects/{name}")).await?;
            println!("project {name} deleted");
            Ok(())
        }
    }
}

fn since_param(s: &str) -> Result<String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc).to_rfc3339());
    }
    let age = parse_duration(s).map_err(anyhow::Error::msg)?;
    let age = chrono::Duration::from_std(age).context("duration too large")?;
    Ok((chrono::Utc::now() - age).to_rfc3339())
}

pub async fn audit(g: &Global, cmd: AuditCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        AuditCommand::List { since, user, project } => {
            let mut query = vec![("limit".to_string(), "1000".to_string())];
            if let Some(s) = since {
                query.push(("since".into(), since_param(&s)?));
            }
            if let Some(u) = user {
                query.push(("user".into(), u));
            }
            if let Some(p) = project {
                query.push(("project".into(), p));
            }
            let mut items = Vec::new();
            loop {
                let page: List<AuditRecord> = c.get_query("audit", &query).await?;
                items.extend(page.items);
                match page.continue_token {
                    Some(t) => {
                        query.retain(|(k, _)| k != "continue");
                        query.push(("continue".into(), t));
                    }
                    None => break,
                }
            }
            print_rows(
                g.output,
                &items,
                &["SEQ", "TIME", "ACTOR", "ACTION", "PROJECT", "STATUS", "SOURCE"],
                |r| {
                    let e = &r.entry;
                    vec![
                        e.seq.to_string(),
                        e.time.format("%Y-%m-%d %H:%M:%S").to_string(),
                        e.actor.clone(),
                        e.action.clone(),
                        e.project.clone().unwrap_or_else(|| "-".into()),
                        match &e.reason {
                            Some(r) => format!("{} {r}", e.status),
                            None => e.status.to_string(),
                        },
                        e.source.clone().unwrap_or_else(|| "-".into()),
                    ]
                },
            )
        }
        AuditCommand::Verify => {
            let v: AuditVerification = c.get_json("audit/verify").await?;
            match g.output {
                Format::Table if v.ok => println!("audit log intact: {} records, chain and anchor verified", v.records),
                Format::Table => {
                    for p in &v.problems {
                        println!("{p}");
                    }
                }
                f => output::print_data(f, &v)?,
            }
            if !v.ok {
                bail!("audit log verification failed ({} problems)", v.problems.len());
            }
            Ok(())
        }
    }
}

fn print_rows<T: serde::Serialize>(
    format: Format,
    items: &[T],
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> Result<()> {
    match format {
        Format::Table => {
            let mut t = output::table(header);
            for i in items {
                t.add_row(row(i));
            }
            println!("{t}");
            Ok(())
        }
        f => output::print_data(f, &items),
    }
}
