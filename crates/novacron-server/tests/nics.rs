//! A VM moves live only with the NICs of its spec plugged in: the target
//! builds those, so a hot-plug still under way would make the two sides'
//! hardware differ.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: panics are failures

mod common;

use axum::http::{Method, StatusCode};
use common::*;
use novacron_api::{NicStatus, Vm};
use novacron_store::StoreExt;
use serde_json::json;

#[tokio::test]
async fn a_vm_moves_live_only_with_its_nics_plugged() {
    let h = Harness::new().await;
    fixtures(&h).await;
    let migrate = || async {
        h.call(
            Method::POST,
            "/v1/migrations",
            Some(&h.admin),
            Some(json!({"vm": "vm-alpha", "target_node": "node-2"})),
        )
        .await
    };
    // vm-alpha's spec has a NIC its QEMU has not reported plugged yet.
    let (status, body) = migrate().await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.to_string().contains("plugging or unplugging NICs"), "{body}");

    h.state
        .store
        .modify::<Vm, _>("vm-alpha", |vm| {
            let nic = &vm.spec.nics[0];
            vm.status.nics = vec![NicStatus {
                network: nic.network.clone(),
                ip: "10.61.0.5".into(),
                mac: nic.mac.clone().unwrap(),
                slot: 0,
            }];
            true
        })
        .await
        .unwrap();
    let (_, body) = migrate().await;
    assert!(!body.to_string().contains("NICs"), "{body}");
}
