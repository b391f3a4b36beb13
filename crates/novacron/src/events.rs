//! `novacron events` (what happened, listed or followed) and
//! `novacron webhook ...` (where events are delivered, signed).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use futures::StreamExt;
use novacron_api::{CreateWebhook, Event, WatchEventType, Webhook};
use novacron_client::Selector;

use crate::commands::client;
use crate::output::{age, print_data, table, Format};
use crate::Global;

#[derive(Args)]
pub struct EventsArgs {
    /// Only the events of one object: KIND/NAME (vm/web-1, node/node-1,
    /// migration/NAME, project/NAME).
    #[arg(long = "for", value_name = "KIND/NAME")]
    about: Option<String>,
    /// Only events of this topic (vm.failed, migration.completed, ...).
    #[arg(long)]
    topic: Option<String>,
    /// Show the last N events (0: all that are kept).
    #[arg(long, default_value_t = 50)]
    last: usize,
    /// Go on printing events as they happen.
    #[arg(long, short = 'w')]
    watch: bool,
}

impl EventsArgs {
    fn selector(&self) -> Result<Selector> {
        let mut fields = Vec::new();
        if let Some(about) = &self.about {
            let Some((kind, name)) = about.split_once('/') else {
                bail!("--for takes KIND/NAME, e.g. vm/web-1");
            };
            fields.push(format!("involved.kind={kind},involved.name={name}"));
        }
        if let Some(t) = &self.topic {
            fields.push(format!("topic={t}"));
        }
        Ok(if fields.is_empty() {
            Selector::everything()
        } else {
            Selector::fields(fields.join(","))
        })
    }
}

pub async fn events(g: &Global, args: EventsArgs) -> Result<()> {
    let c = client(g)?;
    let selector = args.selector()?;
    let (all, revision) = c.list_all::<Event>(&selector).await?;
    let shown = &all[all
        .len()
        .saturating_sub(if args.last == 0 { all.len() } else { args.last })..];
    if g.output != Format::Table {
        if !args.watch {
            return print_data(g.output, &shown);
        }
        for e in shown {
            println!("{}", serde_json::to_string(e)?);
        }
    } else {
        print_rows(shown, true);
    }
    if !args.watch {
        return Ok(());
    }
    let mut changes = c.watch::<Event>(revision, &selector).await?;
    while let Some(change) = changes.next().await {
        let change = change.context("the event stream broke")?;
        if change.event_type != WatchEventType::Added {
            continue; // pruned
        }
        if g.output != Format::Table {
            println!("{}", serde_json::to_string(&change.object)?);
        } else {
            print_rows(std::slice::from_ref(&change.object), false);
        }
    }
    bail!("the server ended the event stream")
}

fn print_rows(events: &[Event], header: bool) {
    let mut t = table(&["TIME", "TYPE", "OBJECT", "TOPIC", "MESSAGE"]);
    for e in events {
        t.add_row(vec![
            e.metadata.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            format!("{:?}", e.severity),
            e.involved.to_string(),
            e.topic.clone(),
            e.message.clone(),
        ]);
    }
    let text = t.to_string();
    // A followed stream prints its rows without the header again.
    for (i, line) in text.lines().enumerate() {
        if header || i > 0 {
            println!("{line}");
        }
    }
}

#[derive(Subcommand)]
pub enum WebhookCommand {
    /// Deliver events to an HTTP receiver: POSTed as JSON, signed
    /// (X-NovaCron-Signature: sha256=HMAC of "TIMESTAMP.BODY" with the
    /// secret, TIMESTAMP in X-NovaCron-Timestamp), retried with backoff.
    Create {
        name: String,
        #[arg(long)]
        url: String,
        /// Topic patterns, comma-separated: vm.running, vm.*, migration.failed, *.
        #[arg(long, value_delimiter = ',', required = true)]
        events: Vec<String>,
        /// Signing key, 16 to 256 characters.
        #[arg(long, env = "NOVACRON_WEBHOOK_SECRET")]
        secret: String,
        /// How long a delivery is retried before it is given up (e.g. 10m).
        #[arg(long, value_parser = crate::parse_duration)]
        retry_for: Option<std::time::Duration>,
    },
    /// List webhooks.
    List,
    /// Show a webhook.
    Get { name: String },
    /// The last deliveries of a webhook (newest last).
    Deliveries { name: String },
    /// Delete a webhook; its pending deliveries stop.
    Delete { name: String },
}

pub async fn webhook(g: &Global, cmd: WebhookCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        WebhookCommand::Create {
            name,
            url,
            events,
            secret,
            retry_for,
        } => {
            let req = CreateWebhook {
                name,
                url,
                events,
                secret,
                retry_for_s: retry_for.map(|d| d.as_secs().max(1)),
            };
            req.validate()
                .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            let w: Webhook = c.post_json("webhooks", &req).await?;
            hooks(g.output, &[w])
        }
        WebhookCommand::List => {
            let all: Vec<Webhook> = c.get_json("webhooks").await?;
            hooks(g.output, &all)
        }
        WebhookCommand::Get { name } => {
            let w: Webhook = c.get(&name).await?;
            hooks(g.output, &[w])
        }
        WebhookCommand::Deliveries { name } => {
            let w: Webhook = c.get(&name).await?;
            if g.output != Format::Table {
                return print_data(g.output, &w.status.deliveries);
            }
            let mut t = table(&[
                "DELIVERY",
                "EVENT",
                "TOPIC",
                "STATE",
                "ATTEMPTS",
                "LAST STATUS",
                "AGE",
                "ERROR",
            ]);
            for d in &w.status.deliveries {
                t.add_row(vec![
                    d.id.clone(),
                    d.event.clone(),
                    d.topic.clone(),
                    d.state.to_string(),
                    d.attempts.to_string(),
                    d.last_status.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                    age(d.created_at),
                    d.last_error.clone().unwrap_or_default(),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        WebhookCommand::Delete { name } => {
            c.delete::<Webhook>(&name).await?;
            println!("webhook {name:?} deleted");
            Ok(())
        }
    }
}

fn hooks(format: Format, items: &[Webhook]) -> Result<()> {
    if format != Format::Table {
        return print_data(format, &items);
    }
    let mut t = table(&["NAME", "URL", "EVENTS", "RETRY FOR", "DELIVERED", "FAILED", "PENDING"]);
    for w in items {
        let count = |s| w.status.deliveries.iter().filter(|d| d.state == s).count().to_string();
        use novacron_api::DeliveryState::*;
        t.add_row(vec![
            w.metadata.name.clone(),
            w.spec.url.clone(),
            w.spec.events.join(","),
            format!("{}s", w.spec.retry_for_s),
            count(Delivered),
            count(Failed),
            count(Pending),
        ]);
    }
    println!("{t}");
    Ok(())
}
