//! The types held to the schema the installed QEMU reports
//! (`query-qmp-schema`): every command exists, reply enums have exactly the
//! schema's values, a reply with only the mandatory members parses and one
//! without any of them fails, and every argument member we send exists with
//! the right type.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::{connect, qemu_installed, start_qemu};
use crate::commands::*;
use crate::types::*;
use crate::{parse_reply, Command, Qmp};

/// The installed QEMU's `query-qmp-schema`, by entity name.
struct Schema(HashMap<String, Value>);

impl Schema {
    async fn load(qmp: &Qmp) -> Schema {
        let list = qmp.execute("query-qmp-schema", None).await.expect("query-qmp-schema");
        let list = list.as_array().expect("schema is a list");
        Schema(
            list.iter()
                .map(|e| (e["name"].as_str().expect("name").to_string(), e.clone()))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> &Value {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not in the schema"))
    }

    fn command(&self, name: &str) -> (&str, &str) {
        let c = self.get(name);
        assert_eq!(c["meta-type"], "command", "{name}");
        (
            c["arg-type"].as_str().expect("arg-type"),
            c["ret-type"].as_str().expect("ret-type"),
        )
    }

    /// Array types stand for their element type when looking up members.
    fn element(&self, ty: &str) -> String {
        let mut ty = ty.to_string();
        while self.get(&ty)["meta-type"] == "array" {
            ty = self.get(&ty)["element-type"]
                .as_str()
                .expect("element-type")
                .to_string();
        }
        ty
    }

    /// Every member of an object type (common ones and every variant's),
    /// with whether it is optional.
    fn members(&self, ty: &str) -> Vec<(String, String, bool)> {
        let t = self.get(ty);
        let mut out: Vec<(String, String, bool)> = t["members"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        let name = m["name"].as_str().expect("member").to_string();
                        let ty = m["type"].as_str().expect("type").to_string();
                        (name, ty, m.get("default").is_some())
                    })
                    .collect()
            })
            .unwrap_or_default();
        for v in t["variants"].as_array().into_iter().flatten() {
            out.extend(self.members(v["type"].as_str().expect("variant type")));
        }
        out
    }

    /// The type at `path` below `ty` (array levels skipped).
    fn type_at(&self, ty: &str, path: &[&str]) -> String {
        let mut ty = self.element(ty);
        for seg in path {
            let (_, member, _) = self
                .members(&ty)
                .into_iter()
                .find(|(n, _, _)| n == seg)
                .unwrap_or_else(|| panic!("{ty} has no member {seg}"));
            ty = self.element(&member);
        }
        ty
    }

    fn enum_values(&self, ty: &str) -> Vec<String> {
        let t = self.get(ty);
        assert_eq!(t["meta-type"], "enum", "{ty}");
        let mut v: Vec<String> = t["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| m["name"].as_str().expect("name").to_string())
            .collect();
        v.sort();
        v
    }

    /// Whether `value` is a valid `ty` (for the arguments we send).
    fn check(&self, value: &Value, ty: &str, at: &str) -> Result<(), String> {
        let t = self.get(ty);
        let fail = |why: &str| Err(format!("{at}: {why}: {value}"));
        match t["meta-type"].as_str().expect("meta-type") {
            "builtin" => {
                let ok = match t["json-type"].as_str().expect("json-type") {
                    "int" => value.is_i64() || value.is_u64(),
                    "number" => value.is_number(),
                    "string" => value.is_string(),
                    "boolean" => value.is_boolean(),
                    "null" => value.is_null(),
                    _ => true,
                };
                if ok {
                    Ok(())
                } else {
                    fail(&format!("not {ty}"))
                }
            }
            "enum" => match value.as_str() {
                Some(s) if self.enum_values(ty).iter().any(|v| v == s) => Ok(()),
                _ => fail("not a value of its enum"),
            },
            "array" => {
                let elem = t["element-type"].as_str().expect("element-type");
                let items = value.as_array().ok_or_else(|| format!("{at}: not an array"))?;
                items.iter().try_for_each(|v| self.check(v, elem, at))
            }
            "alternate" => {
                let alts = t["members"].as_array().expect("members");
                match alts
                    .iter()
                    .any(|m| self.check(value, m["type"].as_str().expect("type"), at).is_ok())
                {
                    true => Ok(()),
                    false => fail("matches no alternative"),
                }
            }
            "object" => {
                let obj = value.as_object().ok_or_else(|| format!("{at}: not an object"))?;
                let mut members: Map<String, Value> = Map::new();
                let mut mandatory = Vec::new();
                let mut add = |ty: &Value| {
                    for m in self.get(ty.as_str().expect("type"))["members"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        let name = m["name"].as_str().expect("name").to_string();
                        if m.get("default").is_none() {
                            mandatory.push(name.clone());
                        }
                        members.insert(name, m["type"].clone());
                    }
                };
                add(&Value::String(ty.to_string()));
                if let Some(tag) = t["tag"].as_str() {
                    let case = obj.get(tag).and_then(Value::as_str).unwrap_or_default();
                    for v in t["variants"].as_array().into_iter().flatten() {
                        if v["case"] == case {
                            add(&v["type"]);
                        }
                    }
                }
                for m in &mandatory {
                    if !obj.contains_key(m) {
                        return fail(&format!("mandatory member {m} missing"));
                    }
                }
                for (k, v) in obj {
                    let Some(mty) = members.get(k).and_then(Value::as_str) else {
                        return fail(&format!("no member {k}"));
                    };
                    self.check(v, mty, &format!("{at}.{k}"))?;
                }
                Ok(())
            }
            other => fail(&format!("unexpected meta-type {other}")),
        }
    }

    /// A value of `ty`: every mandatory member, and the optional ones too
    /// when `full`. A union takes the first case that has members of its own.
    fn sample(&self, ty: &str, full: bool) -> Value {
        self.sample_at(ty, full, 0)
    }

    /// A sample at nesting `depth`: optional members stop a few levels
    /// down, since some types hold themselves (an image's backing image).
    fn sample_at(&self, ty: &str, full: bool, depth: usize) -> Value {
        let t = self.get(ty);
        match t["meta-type"].as_str().expect("meta-type") {
            "builtin" => match t["json-type"].as_str().expect("json-type") {
                "int" => json!(1),
                "number" => json!(1.5),
                "string" => json!("x"),
                "boolean" => json!(true),
                "null" => Value::Null,
                _ => json!({}),
            },
            "enum" => json!(self.enum_values(ty)[0]),
            "array" => json!([self.sample_at(t["element-type"].as_str().expect("element"), full, depth + 1)]),
            "alternate" => self.sample_at(t["members"][0]["type"].as_str().expect("type"), full, depth + 1),
            _ => {
                let mut obj = Map::new();
                let plain = |m: &Value| {
                    (
                        m["name"].as_str().expect("name").to_string(),
                        m.get("default").is_some(),
                    )
                };
                for m in t["members"].as_array().into_iter().flatten() {
                    let (name, optional) = plain(m);
                    if (full && depth < 6) || !optional {
                        obj.insert(name, self.sample_at(m["type"].as_str().expect("type"), full, depth + 1));
                    }
                }
                let with_members = t["variants"].as_array().into_iter().flatten().find(|v| {
                    let vt = self.get(v["type"].as_str().expect("type"));
                    vt["members"].as_array().is_some_and(|m| !m.is_empty())
                });
                if let (Some(tag), Some(v)) = (t["tag"].as_str(), with_members) {
                    obj.insert(tag.to_string(), v["case"].clone());
                    if let Value::Object(more) = self.sample_at(v["type"].as_str().expect("type"), full, depth + 1) {
                        obj.extend(more);
                    }
                }
                Value::Object(obj)
            }
        }
    }
}

/// Paths to every member the schema marks mandatory inside `value`, below
/// the members `modelled` says the Rust type reads.
fn mandatory_paths(
    schema: &Schema,
    ty: &str,
    value: &Value,
    prefix: Vec<String>,
    modelled: &dyn Fn(&[String]) -> bool,
    out: &mut Vec<Vec<String>>,
) {
    let ty = schema.element(ty);
    let value = match value {
        Value::Array(items) => match items.first() {
            Some(v) => v,
            None => return,
        },
        v => v,
    };
    let Some(obj) = value.as_object() else {
        return;
    };
    for (name, mty, optional) in schema.members(&ty) {
        let Some(v) = obj.get(&name) else {
            continue;
        };
        let mut path = prefix.clone();
        path.push(name);
        let read = modelled(&path);
        if !optional && read {
            out.push(path.clone());
        }
        if read && schema.get(&schema.element(&mty))["meta-type"] == "object" {
            mandatory_paths(schema, &mty, v, path, modelled, out);
        }
    }
}

fn at_path<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Map<String, Value>> {
    let mut v = v;
    for seg in path {
        if let Value::Array(items) = v {
            v = items.first_mut()?;
        }
        v = v.as_object_mut()?.get_mut(seg)?;
    }
    if let Value::Array(items) = v {
        v = items.first_mut()?;
    }
    v.as_object_mut()
}

/// The reply type of `C` agrees with the schema: a reply with only the
/// mandatory members parses, one with every member parses, and leaving out
/// any mandatory member that the type reads fails.
fn check_reply<C: Command>(schema: &Schema) {
    let (_, ret) = schema.command(C::NAME);
    let parses = |v: &Value| parse_reply::<C::Reply>(C::NAME, v.clone());
    let minimal = schema.sample(ret, false);
    parses(&minimal).unwrap_or_else(|e| panic!("{}: minimal reply {minimal}: {e:?}", C::NAME));
    let full = schema.sample(ret, true);
    parses(&full).unwrap_or_else(|e| panic!("{}: full reply {full}: {e:?}", C::NAME));
    // A member is read by the type when a wrong value there breaks the parse.
    let modelled = |path: &[String]| {
        let mut v = full.clone();
        let (last, parent) = path.split_last().expect("path");
        if let Some(obj) = at_path(&mut v, parent) {
            obj.insert(last.clone(), json!("\u{1}not-this"));
        }
        parses(&v).is_err()
    };
    let mut paths = Vec::new();
    mandatory_paths(schema, ret, &full, Vec::new(), &modelled, &mut paths);
    for path in paths {
        let (last, parent) = path.split_last().expect("path");
        let mut v = full.clone();
        at_path(&mut v, parent).expect("parent").remove(last);
        assert!(
            parses(&v).is_err(),
            "{}: reply without mandatory {} still parses",
            C::NAME,
            path.join(".")
        );
    }
}

fn check_args<C: Command>(schema: &Schema, args: &C) {
    let (arg, _) = schema.command(C::NAME);
    let v = match serde_json::to_value(args).expect("serialize") {
        Value::Null => json!({}),
        v => v,
    };
    schema.check(&v, arg, C::NAME).unwrap_or_else(|e| panic!("{e}"));
}

fn names(values: &[impl std::fmt::Display]) -> Vec<String> {
    let mut v: Vec<String> = values.iter().map(|x| x.to_string()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn types_match_the_installed_qemus_schema() {
    if !qemu_installed() {
        return;
    }
    let mut q = start_qemu(&["-machine", "none"]);
    let qmp = connect(&mut q).await;
    let schema = Schema::load(&qmp).await;

    // Reply enums: exactly the schema's values (an unknown one fails a reply).
    let reply_enum = |cmd: &str, path: &[&str]| schema.enum_values(&schema.type_at(schema.command(cmd).1, path));
    assert_eq!(names(RunState::ALL), reply_enum("query-status", &["status"]));
    assert_eq!(names(MigrationStatus::ALL), reply_enum("query-migrate", &["status"]));
    assert_eq!(
        names(MigrationCapability::ALL),
        reply_enum("query-migrate-capabilities", &["capability"])
    );
    assert_eq!(names(DirtyRateStatus::ALL), reply_enum("query-dirty-rate", &["status"]));
    assert_eq!(
        names(DirtyRateMeasureMode::ALL),
        reply_enum("query-dirty-rate", &["mode"])
    );
    assert_eq!(
        names(TimeUnit::ALL),
        reply_enum("query-dirty-rate", &["calc-time-unit"])
    );
    assert_eq!(names(JobType::ALL), reply_enum("query-block-jobs", &["type"]));
    assert_eq!(names(JobStatus::ALL), reply_enum("query-block-jobs", &["status"]));
    assert_eq!(
        names(BlockDeviceIoStatus::ALL),
        reply_enum("query-block-jobs", &["io-status"])
    );
    // Argument enums: values this QEMU accepts (some exist only in some builds).
    let arg_enum = |cmd: &str, path: &[&str]| schema.enum_values(&schema.type_at(schema.command(cmd).0, path));
    for (ours, cmd, path) in [
        (names(MirrorSyncMode::ALL), "drive-mirror", "sync"),
        (names(NewImageMode::ALL), "drive-mirror", "mode"),
        (names(MirrorCopyMode::ALL), "drive-mirror", "copy-mode"),
        (
            names(MultiFdCompression::ALL),
            "migrate-set-parameters",
            "multifd-compression",
        ),
        (
            names(MigrationCapability::ALL),
            "migrate-set-capabilities",
            "capabilities.capability",
        ),
        (names(TimeUnit::ALL), "calc-dirty-rate", "calc-time-unit"),
        (names(DirtyRateMeasureMode::ALL), "calc-dirty-rate", "mode"),
    ] {
        let theirs = arg_enum(cmd, &path.split('.').collect::<Vec<_>>());
        for v in ours {
            assert!(theirs.contains(&v), "{cmd} {path}: QEMU has no {v}");
        }
    }

    // Replies.
    check_reply::<QueryStatus>(&schema);
    check_reply::<QueryMigrate>(&schema);
    check_reply::<QueryMigrateCapabilities>(&schema);
    check_reply::<QueryDirtyRate>(&schema);
    check_reply::<QueryBlockJobs>(&schema);
    check_reply::<QueryVersion>(&schema);
    check_reply::<QueryMachines>(&schema);
    check_reply::<QueryCpuDefinitions>(&schema);
    check_reply::<QomList>(&schema);
    check_reply::<QueryNamedBlockNodes>(&schema);
    check_reply::<QueryBlockExports>(&schema);
    for unit in [
        QmpCapabilities::NAME,
        Stop::NAME,
        Cont::NAME,
        SystemPowerdown::NAME,
        SystemReset::NAME,
        Quit::NAME,
        MigrateStartPostcopy::NAME,
        MigrateCancel::NAME,
        NbdServerStop::NAME,
        QueryBlockExports::NAME,
        QueryBlock::NAME,
        Migrate::NAME,
        MigrateIncoming::NAME,
        MigrateSetCapabilities::NAME,
        MigrateSetParameters::NAME,
        CalcDirtyRate::NAME,
        DriveMirror::NAME,
        BlockJobCancel::NAME,
        NbdServerStart::NAME,
        BlockExportAdd::NAME,
        GetFd::NAME,
        AnnounceSelf::NAME,
        NetdevAddTap::NAME,
        NetdevDel::NAME,
        DeviceAddVirtioNet::NAME,
        DeviceDel::NAME,
    ] {
        let (_, ret) = schema.command(unit);
        assert!(schema.members(ret).is_empty(), "{unit} returns something: {ret}");
    }

    // Arguments, every member set.
    for c in [
        QmpCapabilities::NAME,
        QueryStatus::NAME,
        QueryMigrate::NAME,
        QueryBlockJobs::NAME,
    ] {
        let (arg, _) = schema.command(c);
        assert!(schema.members(arg).iter().all(|(_, _, optional)| *optional), "{c}");
    }
    check_args(
        &schema,
        &Migrate {
            uri: "tcp:127.0.0.1:4444".into(),
        },
    );
    check_args(&schema, &NetdevAddTap::new("net0", "nctap0"));
    check_args(&schema, &NetdevDel { id: "net0".into() });
    check_args(&schema, &DeviceDel { id: "nic0".into() });
    check_args(
        &schema,
        &QomList {
            path: "/machine/peripheral".into(),
        },
    );
    // device_add declares only driver, bus and id (the rest is the device's).
    let (arg, _) = schema.command(DeviceAddVirtioNet::NAME);
    let declared: Vec<String> = schema.members(arg).into_iter().map(|(n, _, _)| n).collect();
    for m in ["driver", "id"] {
        assert!(declared.contains(&m.to_string()), "device_add has no {m}");
    }
    check_args(
        &schema,
        &AnnounceSelf {
            initial: 0,
            max: 250,
            rounds: 4,
            step: 100,
        },
    );
    check_args(
        &schema,
        &MigrateIncoming {
            uri: "tcp:127.0.0.1:4444".into(),
            exit_on_error: Some(false),
        },
    );
    check_args(
        &schema,
        &MigrateSetCapabilities {
            capabilities: MigrationCapability::ALL
                .iter()
                .map(|c| MigrationCapabilityStatus::new(*c, false))
                .collect(),
        },
    );
    check_args(
        &schema,
        &MigrateSetParameters {
            throttle_trigger_threshold: Some(50),
            cpu_throttle_initial: Some(20),
            cpu_throttle_increment: Some(10),
            max_cpu_throttle: Some(99),
            max_bandwidth: Some(u64::MAX / 2),
            avail_switchover_bandwidth: Some(1 << 30),
            downtime_limit: Some(300),
            max_postcopy_bandwidth: Some(1 << 30),
            xbzrle_cache_size: Some(1 << 26),
            multifd_channels: Some(4),
            multifd_compression: Some(MultiFdCompression::Zstd),
            multifd_zlib_level: Some(1),
            multifd_zstd_level: Some(3),
            block_bitmap_mapping: None,
        },
    );
    check_args(
        &schema,
        &MigrateSetParameters {
            block_bitmap_mapping: Some(vec![BitmapMigrationNodeAlias {
                node_name: "root".into(),
                alias: "root".into(),
                bitmaps: vec![BitmapMigrationBitmapAlias {
                    name: "nc-cbt".into(),
                    alias: "nc-cbt".into(),
                }],
            }]),
            ..Default::default()
        },
    );
    check_args(
        &schema,
        &CalcDirtyRate {
            calc_time: 1,
            calc_time_unit: Some(TimeUnit::Second),
            sample_pages: Some(4096),
            mode: Some(DirtyRateMeasureMode::PageSampling),
        },
    );
    check_args(
        &schema,
        &QueryDirtyRate {
            calc_time_unit: Some(TimeUnit::Millisecond),
        },
    );
    check_args(
        &schema,
        &DriveMirror {
            job_id: Some("mirror-root".into()),
            device: "root".into(),
            target: "nbd://127.0.0.1:10809/root".into(),
            format: Some("raw".into()),
            sync: MirrorSyncMode::Top,
            mode: Some(NewImageMode::Existing),
            speed: Some(1 << 20),
            copy_mode: Some(MirrorCopyMode::Background),
        },
    );
    check_args(
        &schema,
        &BlockJobCancel {
            device: "mirror-root".into(),
            force: Some(true),
        },
    );
    for addr in [
        SocketAddressLegacy::Inet(InetSocketAddress {
            host: "127.0.0.1".into(),
            port: "10809".into(),
            ipv4: Some(true),
            ipv6: Some(false),
        }),
        SocketAddressLegacy::Unix(UnixSocketAddress {
            path: "/run/nbd.sock".into(),
        }),
        SocketAddressLegacy::Fd(QapiString { str: "nbd".into() }),
    ] {
        check_args(
            &schema,
            &NbdServerStart {
                addr,
                tls_creds: Some("tls0".into()),
                tls_authz: Some("authz0".into()),
                max_connections: Some(4),
            },
        );
    }
    check_args(&schema, &GetFd { fdname: "nbd".into() });
    check_args(
        &schema,
        &BlockExportAdd {
            id: "root".into(),
            node_name: "root".into(),
            writable: Some(true),
            writethrough: Some(false),
            export: BlockExportKind::Nbd(BlockExportNbd {
                name: Some("root".into()),
                description: Some("the root disk".into()),
                allocation_depth: Some(true),
                bitmaps: Some(vec![
                    BitmapRef::Local("nc-frozen".into()),
                    BitmapRef::Node {
                        node: "root".into(),
                        name: "nc-frozen".into(),
                    },
                ]),
            }),
        },
    );
    // Backups: bitmaps, the fleecing job and overlay, exports; snapshots.
    let bitmap_add = BlockDirtyBitmapAdd {
        node: "root".into(),
        name: "nc-cbt".into(),
        granularity: Some(65536),
        persistent: Some(true),
        disabled: Some(false),
    };
    let bitmap = BlockDirtyBitmap {
        node: "root".into(),
        name: "nc-cbt".into(),
    };
    let merge = BlockDirtyBitmapMerge {
        node: "root".into(),
        target: "nc-cbt".into(),
        bitmaps: vec![BitmapRef::Local("nc-frozen".into())],
    };
    check_args(&schema, &bitmap_add);
    check_args(&schema, &BlockDirtyBitmapRemove(bitmap.clone()));
    check_args(&schema, &merge);
    check_args(&schema, &BlockdevBackup::fleecing("fleece-job", "root", "fleece"));
    check_args(
        &schema,
        &BlockExportDel {
            id: "backup-root".into(),
            mode: Some("hard"),
        },
    );
    check_args(&schema, &BlockdevAddQcow2::on_node("fleece", "/v/fleece.qcow2", "root"));
    check_args(&schema, &BlockdevAddQcow2::overlay("root-s1", "/v/root.qcow2"));
    check_args(
        &schema,
        &BlockdevSetActive {
            node_name: Some("root".into()),
            active: true,
        },
    );
    check_args(
        &schema,
        &Transaction {
            actions: vec![
                TransactionAction::BlockdevSnapshot {
                    node: "root".into(),
                    overlay: "root-s1".into(),
                },
                TransactionAction::BlockDirtyBitmapAdd(bitmap_add.clone()),
                TransactionAction::BlockDirtyBitmapMerge(merge.clone()),
                TransactionAction::BlockDirtyBitmapClear(bitmap.clone()),
                TransactionAction::BlockdevBackup(BlockdevBackup::fleecing("fleece-job", "root", "fleece")),
            ],
        },
    );
    for unit in [
        Stop::NAME,
        Cont::NAME,
        SystemPowerdown::NAME,
        SystemReset::NAME,
        Quit::NAME,
        QueryMigrateCapabilities::NAME,
        MigrateStartPostcopy::NAME,
        MigrateCancel::NAME,
        NbdServerStop::NAME,
        QueryBlockExports::NAME,
        QueryBlock::NAME,
        QueryVersion::NAME,
        QueryMachines::NAME,
        QueryCpuDefinitions::NAME,
    ] {
        let (arg, _) = schema.command(unit);
        assert!(schema.members(arg).iter().all(|(_, _, optional)| *optional), "{unit}");
    }
}
