//! The WAN benchmark's tables: per (profile, workload, method) the median and
//! min–max of every run, where the time went (median length of each step of
//! the migrations' timelines), one run's timelines side by side, and the
//! targets judged on medians.

use std::collections::BTreeMap;

use serde_json::Value;

const STEPS: [&str; 13] = [
    "session_open",
    "memory_sample",
    "dirty_rate",
    "link_probe",
    "prepare_target",
    "image_fetch",
    "qemu_start",
    "disk_mirror",
    "memory_passes",
    "postcopy",
    "switchover",
    "target_finish",
    "session_close",
];

/// Median and range of some runs' figures; `None` stands for a failed run,
/// which counts as slower than any finished one.
struct Spread {
    median: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
}

fn spread(values: &[Option<f64>]) -> Spread {
    let mut done: Vec<f64> = values.iter().flatten().copied().collect();
    done.sort_by(f64::total_cmp);
    // Failed runs sort last: the median is a failure when half or more failed.
    let mid = values.len() / 2;
    Spread {
        median: done.get(mid).copied(),
        min: done.first().copied(),
        max: done.last().copied(),
    }
}

fn fmt_spread(s: &Spread, scale: f64, digits: usize, runs: usize, failed: usize) -> String {
    let f = |v: f64| format!("{:.digits$}", v / scale);
    let mut out = match (s.median, s.min, s.max) {
        (Some(m), Some(lo), Some(hi)) => format!("{} ({}–{})", f(m), f(lo), f(hi)),
        _ => "failed".into(),
    };
    if failed > 0 && runs > 0 {
        out.push_str(&format!(" · {failed}/{runs} failed"));
    }
    out
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn percentile(mut v: Vec<f64>, p: f64) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return None;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied()
}

fn s<'a>(r: &'a Value, k: &str) -> &'a str {
    r[k].as_str().unwrap_or("?")
}

fn completed(r: &Value) -> bool {
    r["completed"].as_bool() == Some(true)
}

/// Total time of a run; `None` when it did not complete.
fn total(r: &Value) -> Option<f64> {
    r["total_s"].as_f64().filter(|_| completed(r))
}

/// Length of each step in one migration's timeline (ms; repeated steps add up).
fn step_lengths(r: &Value) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for st in r["timeline"].as_array().into_iter().flatten() {
        if let (Some(name), Some(d)) = (st["step"].as_str(), st["duration_ms"].as_f64()) {
            *out.entry(name.to_string()).or_insert(0.0) += d;
        }
    }
    out
}

type Key = (String, String, String);

pub fn render(rows: &[Value], speed: &[Value], command: &str) -> (String, Value) {
    // Rows in the order they first appear: profiles, then workloads, then methods.
    let mut order: Vec<Key> = Vec::new();
    let mut groups: BTreeMap<Key, Vec<&Value>> = BTreeMap::new();
    for r in rows {
        let key = (
            s(r, "profile").to_string(),
            s(r, "workload").to_string(),
            s(r, "method").to_string(),
        );
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(r);
    }
    let method_rank = |m: &str| ["qemu-plain", "qemu-best", "dwcp"].iter().position(|x| *x == m);
    order.sort_by_key(|(p, w, m)| {
        let profile = ["lan", "metro", "wan", "intercontinental"].iter().position(|x| x == p);
        let first = order_index(rows, p, w);
        (profile, first, method_rank(m))
    });

    let mut md = format!("# WAN migration: QEMU plain vs QEMU best (multifd + zstd) vs DWCP\n\nCommand: `{command}` ");
    md.push_str(
        "(WAN lab, 512 MiB TCG guests; workloads use 256 MiB:\n\
         web-like = HTML-like text rewritten as small counter changes at 8 MiB/s of pages,\n\
         db-like = random data rewritten at 24 MiB/s). Every row ran several times, each run in a\n\
         fresh lab with fresh agents and the methods in a rotating order; cells show the median and,\n\
         in brackets, the min–max over the runs (a failed run counts as slower than any finished one).\n\
         Wire bytes: IP bytes through the lab's TUN devices, both directions. Utilisation: wire bits /\n\
         (total time x link rate). ETA error: |predicted - actual| / actual of the prediction made\n\
         before the transfer. Downtime: the guest's pause, from QEMU's STOP on the source to the\n\
         resume on the target (both hosts share a clock here).\n\n",
    );
    if !speed.is_empty() {
        let v: Vec<f64> = speed.iter().filter_map(|r| r["encode_mb_s"].as_f64()).collect();
        let sp = spread(&v.iter().map(|x| Some(*x)).collect::<Vec<_>>());
        md.push_str(&format!(
            "Machine speed (DWCP codec on web-like pages, zstd 3, one core, measured at the start of each lab): \
             {} MB/s over {} labs.\n\n",
            fmt_spread(&sp, 1.0, 0, v.len(), 0),
            v.len()
        ));
    }
    md.push_str(
        "| profile | workload | method | runs | strategy | total s | downtime ms | wire MiB | link util | ETA error | guest errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut medians = Vec::new();
    for key in &order {
        let runs = &groups[key];
        let n = runs.len();
        let failed = runs.iter().filter(|r| !completed(r)).count();
        let totals: Vec<Option<f64>> = runs.iter().map(|r| total(r)).collect();
        let downtime: Vec<Option<f64>> = runs
            .iter()
            .map(|r| r["downtime_ms"].as_f64().filter(|_| completed(r)))
            .collect();
        let wire: Vec<Option<f64>> = runs.iter().map(|r| r["wire_bytes"].as_f64()).collect();
        let util: Vec<f64> = runs.iter().filter_map(|r| r["link_utilisation"].as_f64()).collect();
        let eta: Vec<f64> = runs.iter().filter_map(|r| r["eta_error"].as_f64()).collect();
        let errors: u64 = runs.iter().filter_map(|r| r["workload_errors"].as_u64()).sum();
        let has_errors = runs.iter().any(|r| r["workload_errors"].is_u64());
        let mut strategies: Vec<&str> = runs.iter().filter_map(|r| r["strategy"].as_str()).collect();
        strategies.sort();
        strategies.dedup();
        let (t, d, w) = (spread(&totals), spread(&downtime), spread(&wire));
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            key.0,
            key.1,
            key.2,
            n,
            if strategies.is_empty() {
                "-".into()
            } else {
                strategies.join(", ")
            },
            fmt_spread(&t, 1.0, 1, n, failed),
            fmt_spread(&d, 1.0, 0, n, 0),
            fmt_spread(&w, 1048576.0, 1, n, 0),
            median(util).map_or("-".into(), |u| format!("{:.0}%", u * 100.0)),
            median(eta).map_or("-".into(), |e| format!("{:.0}%", e * 100.0)),
            if has_errors { errors.to_string() } else { "-".into() },
        ));
        medians.push(serde_json::json!({
            "profile": key.0, "workload": key.1, "method": key.2, "runs": n, "failed": failed,
            "total_s": {"median": t.median, "min": t.min, "max": t.max},
            "downtime_ms": {"median": d.median, "min": d.min, "max": d.max},
            "wire_bytes": {"median": w.median, "min": w.min, "max": w.max},
        }));
    }

    // Where the time went.
    md.push_str(
        "\n## Where the time went (median seconds per step over the finished runs)\n\n\
         Steps overlap (the dirty rate is sampled while the link is probed; the target's image\n\
         and QEMU start are part of its preparation; the switchover is the guest's pause, inside\n\
         which the target finishes), so they do not add up to the total.\n\n",
    );
    let present: Vec<&str> = STEPS
        .iter()
        .copied()
        .filter(|st| rows.iter().any(|r| step_lengths(r).contains_key(*st)))
        .collect();
    md.push_str(&format!(
        "| profile | workload | method | total | {} |\n|---|---|---|---|{}\n",
        present.join(" | "),
        "---|".repeat(present.len())
    ));
    for key in &order {
        let done: Vec<&&Value> = groups[key].iter().filter(|r| completed(r)).collect();
        if done.is_empty() {
            continue;
        }
        let lengths: Vec<BTreeMap<String, f64>> = done.iter().map(|r| step_lengths(r)).collect();
        let cells: Vec<String> = present
            .iter()
            .map(|st| {
                let v: Vec<f64> = lengths.iter().filter_map(|l| l.get(*st).copied()).collect();
                median(v).map_or("-".into(), |ms| format!("{:.2}", ms / 1000.0))
            })
            .collect();
        let t = median(done.iter().filter_map(|r| total(r)).collect()).unwrap_or(0.0);
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {} |\n",
            key.0,
            key.1,
            key.2,
            t,
            cells.join(" | ")
        ));
    }

    // One run's timelines side by side.
    if let Some(run) = rows
        .iter()
        .find(|r| r["profile"] == "wan" && r["workload"] == "web-like" && completed(r))
        .and_then(|r| r["run"].as_u64())
    {
        md.push_str(&format!(
            "\n## Timelines of run {run}, wan, web-like (start + length, seconds)\n\n| step |"
        ));
        let those: Vec<&Value> = ["qemu-plain", "qemu-best", "dwcp"]
            .iter()
            .filter_map(|m| {
                rows.iter().find(|r| {
                    r["profile"] == "wan" && r["workload"] == "web-like" && r["method"] == *m && r["run"] == run
                })
            })
            .collect();
        for r in &those {
            md.push_str(&format!(" {} |", s(r, "method")));
        }
        md.push_str(&format!("\n|---|{}\n", "---|".repeat(those.len())));
        for st in STEPS {
            let cells: Vec<String> = those
                .iter()
                .map(|r| {
                    r["timeline"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|x| x["step"] == st)
                        .map(|x| {
                            format!(
                                "{:.2} + {:.2}",
                                x["start_ms"].as_f64().unwrap_or(0.0) / 1000.0,
                                x["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .collect();
            if cells.iter().any(|c| !c.is_empty()) {
                md.push_str(&format!("| {st} | {} |\n", cells.join(" | ")));
            }
        }
        let totals: Vec<String> = those
            .iter()
            .map(|r| total(r).map_or("failed".into(), |t| format!("{t:.2}")))
            .collect();
        md.push_str(&format!("| **total** | {} |\n", totals.join(" | ")));
    }

    md.push_str("\n## Targets (medians)\n\n");
    md.push_str(&targets(&groups, rows));
    let json = serde_json::json!({ "medians": medians, "machine_speed": speed, "runs": rows });
    (md, json)
}

fn order_index(rows: &[Value], p: &str, w: &str) -> usize {
    rows.iter()
        .position(|r| r["profile"] == p && r["workload"] == w)
        .unwrap_or(usize::MAX)
}

fn targets(groups: &BTreeMap<Key, Vec<&Value>>, rows: &[Value]) -> String {
    let mut out = String::new();
    let med = |p: &str, w: &str, m: &str| -> Option<f64> {
        let runs = groups.get(&(p.to_string(), w.to_string(), m.to_string()))?;
        spread(&runs.iter().map(|r| total(r)).collect::<Vec<_>>()).median
    };
    let runs = |p: &str, w: &str, m: &str| {
        groups
            .get(&(p.to_string(), w.to_string(), m.to_string()))
            .map_or(0, Vec::len)
    };
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    if let (Some(plain), Some(best), Some(d)) = (
        med("wan", "web-like", "qemu-plain"),
        med("wan", "web-like", "qemu-best"),
        med("wan", "web-like", "dwcp"),
    ) {
        out.push_str(&format!(
            "- wan, web-like ({} runs): DWCP {:.2}x faster than qemu-plain (target 2x: {}), {:.2}x faster than qemu-best (target 1.3x: {})\n",
            runs("wan", "web-like", "dwcp"),
            plain / d,
            verdict(plain / d >= 2.0),
            best / d,
            verdict(best / d >= 1.3)
        ));
    }
    if let Some(d) = med("intercontinental", "web-like", "dwcp") {
        let best = med("intercontinental", "web-like", "qemu-best");
        let down = groups
            .get(&("intercontinental".into(), "web-like".into(), "dwcp".into()))
            .and_then(|runs| {
                spread(
                    &runs
                        .iter()
                        .map(|r| r["downtime_ms"].as_f64().filter(|_| completed(r)))
                        .collect::<Vec<_>>(),
                )
                .median
            });
        out.push_str(&format!(
            "- intercontinental, web-like ({} runs): DWCP {} faster than qemu-best (target 1.5x: {}), downtime {} (target <= 150 ms: {})\n",
            runs("intercontinental", "web-like", "dwcp"),
            best.map_or("?".into(), |b| format!("{:.2}x", b / d)),
            verdict(best.is_some_and(|b| b / d >= 1.5)),
            down.map_or("?".into(), |x| format!("{x:.0} ms")),
            verdict(down.is_some_and(|x| x <= 150.0))
        ));
    }
    let mut pairs: Vec<(String, String)> = groups.keys().map(|(p, w, _)| (p.clone(), w.clone())).collect();
    pairs.dedup();
    for (p, w) in pairs.iter().filter(|(_, w)| !w.starts_with("five-vm")) {
        let d = med(p, w, "dwcp");
        let best = med(p, w, "qemu-best");
        let text = match (d, best) {
            (Some(d), Some(b)) => format!("{:.2}", d / b),
            (Some(_), None) => "qemu-best failed".into(),
            (None, _) => "DWCP failed".into(),
        };
        let ok = match (d, best) {
            (Some(d), Some(b)) => d <= b,
            (Some(_), None) => true,
            (None, _) => false,
        };
        out.push_str(&format!(
            "- {p}, {w}: DWCP / qemu-best time = {text} (target <= 1: {})\n",
            verdict(ok)
        ));
    }
    // Five VMs from one image: wire bytes of all five, per run, then the median ratio.
    let mut ratios = Vec::new();
    let mut by_run: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for r in rows.iter().filter(|r| s(r, "workload").starts_with("five-vm")) {
        let e = by_run.entry(r["run"].as_u64().unwrap_or(0)).or_default();
        let w = r["wire_bytes"].as_f64().unwrap_or(0.0);
        match s(r, "method") {
            "dwcp" => e.1 += w,
            "qemu-best" => e.0 += w,
            _ => {}
        }
    }
    for (best, d) in by_run.values() {
        if *best > 0.0 && *d > 0.0 {
            ratios.push(d / best);
        }
    }
    if let Some(r) = median(ratios.clone()) {
        out.push_str(&format!(
            "- five VMs from one image, one after another: DWCP / qemu-best wire bytes = {r:.2} (median of {} runs; target <= 0.25: {})\n",
            ratios.len(),
            verdict(r <= 0.25)
        ));
    }
    let errs: Vec<f64> = rows
        .iter()
        .filter(|r| r["method"] == "dwcp")
        .filter_map(|r| r["eta_error"].as_f64())
        .collect();
    if let (Some(m), Some(p90)) = (median(errs.clone()), percentile(errs.clone(), 0.9)) {
        out.push_str(&format!(
            "- ETA error of DWCP predictions over {} migrations: median {:.0}% (target <= 10%: {}), 90th percentile {:.0}% (target <= 25%: {})\n",
            errs.len(),
            m * 100.0,
            verdict(m <= 0.10),
            p90 * 100.0,
            verdict(p90 <= 0.25)
        ));
    }
    out
}
