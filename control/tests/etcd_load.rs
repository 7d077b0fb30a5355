//! Load reports against a real etcd: routers publish under leases, the watch sums them,
//! and a router's counts leave the sum when it revokes, crashes or is cut off past its
//! TTL (and come back when it returns).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use moe_control::{
    watch_load, watch_load_reports, ExpertKey, ExpertLoadReport, LoadReporter, RegistrationState,
};
use support::{config, start_etcd, wait_until, within, TcpProxy, DEADLINE};

fn report(counts: &[(usize, u32, u64)]) -> ExpertLoadReport {
    ExpertLoadReport {
        router: String::new(),
        window_secs: 10.0,
        counts: counts.to_vec(),
    }
}

fn load(counts: &[((usize, u32), u64)]) -> BTreeMap<ExpertKey, u64> {
    counts.iter().copied().collect()
}

#[tokio::test]
async fn two_routers_are_summed_and_leave_the_sum_when_they_go() {
    let etcd = start_etcd();
    let cfg = config(&etcd.endpoint(), "l1");
    let view = watch_load(&cfg);
    let mut sum = view.subscribe();

    // A TTL longer than the wait deadline: only the revoke can remove it in time.
    let a = LoadReporter::start(cfg.clone(), "router-a", DEADLINE * 2).unwrap();
    let b = LoadReporter::start(cfg.clone(), "router-b", Duration::from_secs(2)).unwrap();
    a.publish(report(&[(0, 0, 10), (0, 1, 5)])).unwrap();
    b.publish(report(&[(0, 0, 7), (1, 3, 1)])).unwrap();
    let want = load(&[((0, 0), 17), ((0, 1), 5), ((1, 3), 1)]);
    wait_until("both reports summed", &mut sum, |m| *m == want).await;
    assert!(view.is_connected());
    wait_until(
        "a connected",
        &mut a.subscribe(),
        RegistrationState::is_registered,
    )
    .await;

    // Each router's report on its own, keyed by router id.
    let reports = watch_load_reports(&cfg);
    let seen = wait_until("both reports", &mut reports.subscribe(), |r| r.len() == 2).await;
    assert_eq!(seen["router-a"].router, "router-a");
    assert_eq!(seen["router-b"].counts, [(0, 0, 7), (1, 3, 1)]);

    // The latest report replaces the one before.
    a.publish(report(&[(0, 0, 1)])).unwrap();
    let want = load(&[((0, 0), 8), ((1, 3), 1)]);
    wait_until("a's newer report", &mut sum, |m| *m == want).await;

    // A graceful stop removes a's counts at once.
    within("revoke", a.revoke()).await.unwrap();
    let want = load(&[((0, 0), 7), ((1, 3), 1)]);
    wait_until("a's counts gone", &mut sum, |m| *m == want).await;

    // A crash (dropped without revoke): b's lease expires and its counts go.
    drop(b);
    wait_until("b's lease to expire", &mut sum, BTreeMap::is_empty).await;
}

#[tokio::test]
async fn a_router_cut_off_past_its_ttl_drops_out_and_reports_again_on_return() {
    let etcd = start_etcd();
    let proxy = TcpProxy::start(etcd.addr()).await;
    let direct = config(&etcd.endpoint(), "l2");
    let mut sum = watch_load(&direct).subscribe();
    let steady = LoadReporter::start(direct.clone(), "steady", DEADLINE * 2).unwrap();
    let cut = LoadReporter::start(
        config(&proxy.endpoint(), "l2"),
        "cut",
        Duration::from_secs(2),
    )
    .unwrap();
    let mut state = cut.subscribe();
    steady.publish(report(&[(0, 0, 3)])).unwrap();
    cut.publish(report(&[(0, 0, 4), (0, 2, 2)])).unwrap();
    let want = load(&[((0, 0), 7), ((0, 2), 2)]);
    wait_until("both reports summed", &mut sum, |m| *m == want).await;

    proxy.cut();
    wait_until("the cut-off writer to notice", &mut state, |s| {
        *s == RegistrationState::Disconnected
    })
    .await;
    // Published while away: written once etcd is reachable again.
    cut.publish(report(&[(0, 2, 9)])).unwrap();
    let want = load(&[((0, 0), 3)]);
    wait_until("the cut-off report to expire", &mut sum, |m| *m == want).await;

    proxy.heal();
    let want = load(&[((0, 0), 3), ((0, 2), 9)]);
    wait_until("the latest report under a fresh lease", &mut sum, |m| {
        *m == want
    })
    .await;
    wait_until(
        "the writer to reconnect",
        &mut state,
        RegistrationState::is_registered,
    )
    .await;
}
