//! `novacron backup ...` and `novacron backup-store ...`: backups of VMs
//! and the datastores they go to.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use novacron_api::backup::parse_backup_id;
use novacron_api::{Backup, BackupEvent, BackupStore, BackupVerification, CreateBackup, CreateBackupStore};

use crate::commands::client;
use crate::output::{age, human_bytes, print_data, table, Format};
use crate::Global;

#[derive(Subcommand)]
pub enum BackupCommand {
    /// Back up a running VM's disks (all at one instant, while it runs):
    /// the first backup reads every block, later ones only those changed.
    Create {
        vm: String,
        /// The store (default: local).
        #[arg(long)]
        store: Option<String>,
    },
    /// List backups, oldest first.
    List {
        /// Only this store's.
        #[arg(long)]
        store: Option<String>,
        /// Only this VM's.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Show a backup (`STORE:VM/TIME`, as `backup list` prints it).
    Get { id: String },
    /// Delete a backup (its chunks go when no other backup uses them).
    Delete { id: String },
    /// Read back every chunk of a backup and check it against its digest.
    Verify { id: String },
    /// Remove a VM's backups in a store that the keep rules do not keep
    /// (their chunks go at the store's next `backup-store gc`).
    Prune {
        vm: String,
        #[arg(long)]
        store: Option<String>,
        #[command(flatten)]
        keep: KeepArgs,
        /// Only say what would go.
        #[arg(long)]
        dry_run: bool,
    },
    /// Make a new VM from a backup: the backed-up VM's settings and disks,
    /// with addresses and MACs of its own; or, --in-place, put the backup's
    /// disks over a stopped VM's (all or none; waits until they are).
    Restore {
        id: String,
        /// The new VM's name (with --in-place: the VM to restore into;
        /// default the backed-up VM).
        #[arg(long = "as", required_unless_present = "in_place")]
        name: Option<String>,
        /// Start it once restored (a new VM only).
        #[arg(long, conflicts_with = "in_place")]
        start: bool,
        /// Replace the disks of a stopped VM (without snapshots).
        #[arg(long)]
        in_place: bool,
        /// Start the new VM at once, reading what is not restored yet from
        /// the backup on demand while the rest streams in (`vm get` shows
        /// how far).
        #[arg(long, conflicts_with = "in_place")]
        live: bool,
        /// A new VM from a backup with volumes: restore its own disks only
        /// (volumes come back only --in-place, into the VM they are attached to).
        #[arg(long, conflicts_with = "in_place")]
        without_volumes: bool,
    },
}

/// Retention flags (PBS's keep rules), for `backup prune` and policies.
#[derive(clap::Args)]
pub struct KeepArgs {
    /// The newest N backups.
    #[arg(long)]
    keep_last: Option<u32>,
    /// The newest backup of each of the newest N hours (days, ...) that have one.
    #[arg(long)]
    keep_hourly: Option<u32>,
    #[arg(long)]
    keep_daily: Option<u32>,
    #[arg(long)]
    keep_weekly: Option<u32>,
    #[arg(long)]
    keep_monthly: Option<u32>,
    #[arg(long)]
    keep_yearly: Option<u32>,
}

impl KeepArgs {
    pub fn rules(&self) -> novacron_api::backup::KeepRules {
        novacron_api::backup::KeepRules {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
        }
    }
}

#[derive(Subcommand)]
pub enum BackupKeyCommand {
    /// Make a new random backup key in FILE (mode 0600; never over a file)
    /// and print its id. Keep a copy off the cluster: backups sealed with
    /// it cannot be restored without it.
    Create { file: std::path::PathBuf },
    /// Print a key file's id.
    Id { file: std::path::PathBuf },
}

pub fn backup_key(cmd: BackupKeyCommand) -> Result<()> {
    let key = match cmd {
        BackupKeyCommand::Create { file } => novacron_backup::ChunkKey::create(&file)?,
        BackupKeyCommand::Id { file } => novacron_backup::ChunkKey::load(&file)?,
    };
    println!("{}", key.id_hex());
    Ok(())
}

#[derive(Subcommand)]
pub enum BackupStoreCommand {
    /// Register a datastore: a directory on the server's machine (made if
    /// missing; an existing datastore is taken over with its backups), or
    /// with --url a `backup-store serve` process elsewhere.
    Add {
        name: String,
        #[arg(required_unless_present = "url", conflicts_with = "url")]
        path: Option<String>,
        /// https://HOST:PORT of a backup-store process.
        #[arg(long)]
        url: Option<String>,
        /// Keep every backup here sealed with this backup key (client-side
        /// encryption): only its id goes to the server; agents started
        /// with `--backup-key` of the same key encrypt and restore.
        #[arg(long)]
        encryption_key: Option<std::path::PathBuf>,
    },
    /// List the stores.
    List,
    /// Forget a store (its directory stays).
    Remove { name: String },
    /// Copy into DST the backups SRC has and DST lacks (only the chunks it
    /// lacks, many in flight: for off-site copies over long links).
    Sync {
        src: String,
        dst: String,
        /// Only this VM's backups.
        #[arg(long)]
        vm: Option<String>,
        /// Chunk transfers at once (default 32).
        #[arg(long)]
        in_flight: Option<u32>,
    },
    /// Serve a datastore directory as a backup store of its own (on a
    /// machine that is not a hypervisor); add it with `backup-store add
    /// NAME --url https://HOST:PORT`.
    Serve(crate::store_role::ServeArgs),
    /// Remove the chunks no backup in the store names.
    Gc {
        name: String,
        /// Keep chunks written in the last this many seconds (default 300).
        #[arg(long)]
        grace_s: Option<u32>,
    },
}

/// `STORE:VM/TIME` as the API's path `STORE/VM/TIME`.
fn backup_path(id: &str) -> Result<String> {
    let (store, vm, time) =
        parse_backup_id(id).with_context(|| format!("{id:?} is not a backup id (STORE:VM/TIME)"))?;
    Ok(format!("backups/{store}/{vm}/{time}"))
}

pub async fn backup(g: &Global, cmd: BackupCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        BackupCommand::Create { vm, store } => {
            let req = CreateBackup { store };
            req.validate()
                .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            let backup = follow(&c, &vm, &req).await?;
            backups(g.output, &[backup])
        }
        BackupCommand::List { store, vm } => {
            let mut q = Vec::new();
            if let Some(s) = store {
                q.push(("store".to_string(), s));
            }
            if let Some(v) = vm {
                q.push(("vm".to_string(), v));
            }
            let all: Vec<Backup> = c.get_query("backups", &q).await?;
            backups(g.output, &all)
        }
        BackupCommand::Get { id } => {
            let b: Backup = c.get_json(&backup_path(&id)?).await?;
            if g.output != Format::Table {
                return print_data(g.output, &b);
            }
            backups(g.output, std::slice::from_ref(&b))?;
            let mut t = table(&["DISK", "SIZE", "READ", "FROM PREVIOUS", "NEW CHUNKS", "STORED"]);
            for d in &b.disks {
                t.add_row(vec![
                    d.name.clone(),
                    human_bytes(d.size),
                    human_bytes(d.bytes_read),
                    human_bytes(d.bytes_from_previous),
                    d.chunks_new.to_string(),
                    human_bytes(d.stored_bytes),
                ]);
            }
            println!("{t}");
            if let Some(why) = &b.full_reason {
                println!("full backup: {why}");
            }
            Ok(())
        }
        BackupCommand::Prune {
            vm,
            store,
            keep,
            dry_run,
        } => {
            let keep = keep.rules();
            keep.validate()
                .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            let req = novacron_api::backup::PruneBackups {
                vm,
                store,
                keep,
                dry_run,
            };
            let r: novacron_api::backup::PruneResult = c.post_json("backups/prune", &req).await?;
            if g.output != Format::Table {
                return print_data(g.output, &r);
            }
            let verb = if dry_run { "would remove" } else { "removed" };
            for id in &r.kept {
                println!("keep    {id}");
            }
            for id in &r.removed {
                println!("{verb:<7} {id}");
            }
            println!("{} kept, {} {verb}", r.kept.len(), r.removed.len());
            Ok(())
        }
        BackupCommand::Restore {
            id,
            name,
            start,
            in_place,
            live,
            without_volumes,
        } => {
            let path = backup_path(&id)?;
            let name = match name {
                Some(n) => n,
                // parse_backup_id succeeded in backup_path.
                None => parse_backup_id(&id)
                    .map(|(_, vm, _)| vm.to_string())
                    .unwrap_or_default(),
            };
            let req = novacron_api::backup::RestoreBackup {
                name,
                start,
                in_place,
                live,
                without_volumes,
            };
            let vm: novacron_api::Vm = c.post_json(&format!("{path}/restore"), &req).await?;
            if in_place {
                return restored_in_place(&c, g.output, vm, &id).await;
            }
            if g.output != Format::Table {
                return print_data(g.output, &vm);
            }
            if live {
                println!(
                    "VM {:?} created from backup {id}; it starts at once while its disks stream in (`novacron vm get {}` shows how far)",
                    vm.metadata.name, vm.metadata.name
                );
                return Ok(());
            }
            println!(
                "VM {:?} created from backup {id}; its disks are restored when it first starts{}",
                vm.metadata.name,
                if start { " (now)" } else { "" }
            );
            Ok(())
        }
        BackupCommand::Delete { id } => {
            c.delete_path(&backup_path(&id)?).await?;
            println!("backup {id} deleted");
            Ok(())
        }
        BackupCommand::Verify { id } => {
            let v: BackupVerification = c
                .post_json(&format!("{}/verify", backup_path(&id)?), &serde_json::json!({}))
                .await?;
            if g.output != Format::Table {
                print_data(g.output, &v)?;
            } else {
                println!(
                    "{}: {} chunks ({}) checked, {}",
                    v.id,
                    v.chunks_checked,
                    human_bytes(v.bytes_checked),
                    if v.ok { "all good" } else { "DAMAGED" }
                );
                for e in &v.errors {
                    println!("  {e}");
                }
            }
            if !v.ok {
                bail!("backup {} is damaged", v.id);
            }
            Ok(())
        }
    }
}

/// Runs a backup, showing its progress, until it is stored or fails.
async fn follow(c: &novacron_client::Client, vm: &str, req: &CreateBackup) -> Result<Backup> {
    let stream = c
        .post_ndjson::<_, BackupEvent>(&format!("vms/{vm}/backups"), req)
        .await?;
    let mut stream = std::pin::pin!(stream);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let outcome = loop {
        let Some(event) = stream.next().await else {
            break Err(anyhow::anyhow!(
                "The server closed the backup's progress stream early: see `novacron backup list --vm {vm}`"
            ));
        };
        match event.context("The server sent a progress line that is not a BackupEvent")? {
            BackupEvent::Progress { disk, done, size } => {
                bar.set_message(format!("disk {disk}"));
                bar.set_length(size);
                bar.set_position(done);
            }
            BackupEvent::Done(b) => break Ok(b),
            BackupEvent::Failed { message } => break Err(anyhow::anyhow!("The backup failed: {message}")),
        }
    };
    bar.finish_and_clear();
    outcome
}

/// Waits for the VM's agent to carry out a restore in place.
async fn restored_in_place(c: &novacron_client::Client, format: Format, vm: novacron_api::Vm, id: &str) -> Result<()> {
    let (name, generation) = (vm.metadata.name.clone(), vm.spec.restore_generation);
    let bar = ProgressBar::new_spinner();
    bar.set_message(format!("restoring the disks of VM {name:?} from {id}"));
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let vm = loop {
        let vm: novacron_api::Vm = c.get(&name).await?;
        if vm.status.observed_restore_generation >= generation {
            break vm;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    bar.finish_and_clear();
    if let Some(why) = vm.status.reason.as_deref().filter(|r| r.starts_with("Restore failed")) {
        bail!("VM {name:?}: {why}");
    }
    if format != Format::Table {
        return print_data(format, &vm);
    }
    println!("VM {name:?} has the disks of backup {id} (stopped; start it with `novacron vm start {name}`)");
    Ok(())
}

/// Runs a sync, showing its progress, until it is done or fails.
async fn follow_sync(
    c: &novacron_client::Client,
    dst: &str,
    req: &novacron_api::backup::SyncBackups,
) -> Result<novacron_api::backup::SyncResult> {
    use novacron_api::backup::SyncEvent;
    let stream = c
        .post_ndjson::<_, SyncEvent>(&format!("backup-stores/{dst}/sync"), req)
        .await?;
    let mut stream = std::pin::pin!(stream);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("chunks [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let outcome = loop {
        let Some(event) = stream.next().await else {
            break Err(anyhow::anyhow!("The server closed the sync's progress stream early"));
        };
        match event.context("The server sent a progress line that is not a SyncEvent")? {
            SyncEvent::Progress(p) => {
                bar.set_length(p.chunks_total);
                bar.set_position(p.chunks_done);
                bar.set_message(human_bytes(p.bytes_done));
            }
            SyncEvent::Done(r) => break Ok(r),
            SyncEvent::Failed { message } => break Err(anyhow::anyhow!("The sync failed: {message}")),
        }
    };
    bar.finish_and_clear();
    outcome
}

fn backups(format: Format, items: &[Backup]) -> Result<()> {
    if format != Format::Table {
        return print_data(format, &items);
    }
    let mut t = table(&["ID", "VM", "KIND", "SIZE", "READ", "STORED", "TOOK", "VERIFIED", "AGE"]);
    for b in items {
        let sum = |f: fn(&novacron_api::BackupDisk) -> u64| b.disks.iter().map(f).sum::<u64>();
        t.add_row(vec![
            b.id.clone(),
            b.vm.clone(),
            if b.incremental() { "incremental" } else { "full" }.into(),
            human_bytes(sum(|d| d.size)),
            human_bytes(sum(|d| d.bytes_read)),
            human_bytes(sum(|d| d.stored_bytes)),
            format!("{:.1}s", b.duration_ms as f64 / 1000.0),
            match &b.verified {
                None => "-".into(),
                Some(v) if v.ok => format!("ok {} ago", age(v.at)),
                Some(v) => format!("DAMAGED ({} errors)", v.errors),
            },
            age(b.time),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub async fn backup_store(g: &Global, cmd: BackupStoreCommand) -> Result<()> {
    if let BackupStoreCommand::Serve(a) = cmd {
        // The role needs no API client (nor a token): it joins with its own.
        return crate::store_role::serve(g, a).await;
    }
    let c = client(g)?;
    match cmd {
        BackupStoreCommand::Serve(a) => crate::store_role::serve(g, a).await,
        BackupStoreCommand::Sync {
            src,
            dst,
            vm,
            in_flight,
        } => {
            let req = novacron_api::backup::SyncBackups {
                from: src,
                vm,
                in_flight,
            };
            req.validate()
                .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            let r = follow_sync(&c, &dst, &req).await?;
            if g.output != Format::Table {
                return print_data(g.output, &r);
            }
            println!(
                "{} backups copied ({} there already), {} chunks ({}) copied, {} there already, in {:.1} s ({}/s)",
                r.backups_copied.len(),
                r.backups_present,
                r.chunks_copied,
                human_bytes(r.bytes_copied),
                r.chunks_present,
                r.duration_ms as f64 / 1000.0,
                human_bytes((r.bytes_copied as f64 / (r.duration_ms.max(1) as f64 / 1000.0)) as u64)
            );
            Ok(())
        }
        BackupStoreCommand::Add {
            name,
            path,
            url,
            encryption_key,
        } => {
            let encryption_key_id = match encryption_key {
                Some(file) => Some(novacron_backup::ChunkKey::load(&file)?.id_hex()),
                None => None,
            };
            let req = CreateBackupStore {
                name,
                path,
                url,
                encryption_key_id,
            };
            req.validate()
                .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            let s: BackupStore = c.post_json("backup-stores", &req).await?;
            stores(g.output, &[s])
        }
        BackupStoreCommand::List => {
            let all: Vec<BackupStore> = c.get_json("backup-stores").await?;
            stores(g.output, &all)
        }
        BackupStoreCommand::Gc { name, grace_s } => {
            let path = match grace_s {
                Some(g) => format!("backup-stores/{name}/gc?grace_s={g}"),
                None => format!("backup-stores/{name}/gc"),
            };
            let r: novacron_api::backup::GcResult = c.post_json(&path, &serde_json::json!({})).await?;
            if g.output != Format::Table {
                return print_data(g.output, &r);
            }
            println!(
                "{} chunks removed ({}), {} in use, {} recent kept, {} abandoned backups removed, in {} ms",
                r.chunks_removed,
                human_bytes(r.bytes_removed),
                r.chunks_in_use,
                r.chunks_recent,
                r.abandoned_removed,
                r.duration_ms
            );
            Ok(())
        }
        BackupStoreCommand::Remove { name } => {
            c.delete_path(&format!("backup-stores/{name}")).await?;
            println!("backup store {name:?} removed (its directory stays)");
            Ok(())
        }
    }
}

fn stores(format: Format, items: &[BackupStore]) -> Result<()> {
    if format != Format::Table {
        return print_data(format, &items);
    }
    let mut t = table(&["NAME", "WHERE", "SEALED WITH", "AGE"]);
    for s in items {
        t.add_row(vec![
            s.metadata.name.clone(),
            s.spec.url.clone().unwrap_or_else(|| s.spec.path.clone()),
            s.spec.encryption_key_id.clone().unwrap_or_else(|| "-".into()),
            age(s.metadata.created_at),
        ]);
    }
    println!("{t}");
    Ok(())
}
