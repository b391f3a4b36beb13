//! `novacron ca ...` and `novacron node revoke`: the cluster's certificates.

use anyhow::{Context, Result};
use clap::Subcommand;
use novacron_api::{ClusterTrust, RevokedCert, CLUSTER_TRUST};

use crate::commands::client;
use crate::output::{self, Format};
use crate::Global;

#[derive(Subcommand)]
pub enum CaCommand {
    /// Show the trusted CAs, whether a rotation is under way, and the revoked certificates.
    Show {
        /// Print only the trusted CA certificates (PEM): what clients should trust.
        #[arg(long)]
        pem: bool,
    },
    /// Start a rotation: a new CA issues from now on, both are trusted;
    /// agents renew onto the new CA by themselves.
    Rotate,
    /// Finish the rotation: stop trusting the previous CA (refused while a
    /// node still holds a certificate from it).
    FinishRotation,
}

pub async fn ca(g: &Global, cmd: CaCommand) -> Result<()> {
    let c = client(g)?;
    let pem_only = matches!(cmd, CaCommand::Show { pem: true });
    let trust: ClusterTrust = match cmd {
        CaCommand::Show { .. } => {
            let (all, _) = c
                .list_all::<ClusterTrust>(&novacron_client::Selector::everything())
                .await?;
            all.into_iter()
                .find(|t| t.metadata.name == CLUSTER_TRUST)
                .context("the server publishes no cluster trust (it runs without TLS)")?
        }
        CaCommand::Rotate => {
            let t = c.post_json("ca/rotate", &serde_json::json!({})).await?;
            println!("the CA rotation started: new certificates come from the new CA; both are trusted");
            t
        }
        CaCommand::FinishRotation => {
            let t = c.post_json("ca/finish-rotation", &serde_json::json!({})).await?;
            println!("the CA rotation is finished: only the new CA is trusted");
            t
        }
    };
    if pem_only {
        print!("{}", trust.ca_pem);
        return Ok(());
    }
    if g.output != Format::Table {
        return output::print_data(g.output, &trust);
    }
    let cas = trust.ca_pem.matches("-----BEGIN CERTIFICATE-----").count();
    match trust.rotation_started {
        Some(since) => println!("CAs trusted: {cas} (rotation under way since {})", since.to_rfc3339()),
        None => println!("CAs trusted: {cas}"),
    }
    println!("revoked certificates: {}", trust.revoked.len());
    for r in &trust.revoked {
        println!(
            "  {}  node {}  revoked {}",
            &r.cert_sha256[..16.min(r.cert_sha256.len())],
            r.node,
            r.revoked_at.to_rfc3339()
        );
    }
    Ok(())
}

/// `novacron node revoke NAME`.
pub async fn revoke_node(g: &Global, name: &str) -> Result<()> {
    let c = client(g)?;
    let revoked: Vec<RevokedCert> = c
        .post_json(&format!("nodes/{name}/revoke"), &serde_json::json!({}))
        .await
        .with_context(|| format!("Cannot revoke node {name:?}"))?;
    if g.output != Format::Table {
        return output::print_data(g.output, &revoked);
    }
    println!(
        "node {name:?}: {} certificate(s) revoked; the server refuses them now, agents once they see the cluster's trust",
        revoked.len()
    );
    Ok(())
}
