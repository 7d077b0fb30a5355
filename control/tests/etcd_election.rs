//! Controller election against a real etcd: one leader at a time, takeover on resign
//! and on lease expiry, and fencing of a deposed leader's writes.

mod support;

use std::time::Duration;

use moe_control::{
    fenced_put, watch_leader, ControlError, Election, EtcdClient, FencingToken, Leadership,
    PlacementStore,
};
use serde_json::json;
use support::{config, start_etcd, wait_until, within, TcpProxy, DEADLINE};

async fn wait_leader(e: &Election) -> FencingToken {
    let what = format!("{} to lead", e.candidate());
    match wait_until(&what, &mut e.leadership(), |l| {
        matches!(l, Leadership::Leader(_))
    })
    .await
    {
        Leadership::Leader(t) => t,
        Leadership::Follower => unreachable!("waited for Leader"),
    }
}

#[tokio::test]
async fn one_leader_at_a_time_and_the_other_takes_over_after_resign() {
    let etcd = start_etcd();
    let cfg = config(&etcd.endpoint(), "e1");
    let view = watch_leader(cfg.clone());
    let mut leader = view.subscribe();
    let a = Election::campaign(cfg.clone(), "a", DEADLINE * 2).unwrap();
    let b = Election::campaign(cfg.clone(), "b", DEADLINE * 2).unwrap();

    let first = wait_until("a leader", &mut leader, Option::is_some)
        .await
        .expect("some leader");
    let (winner, other) = if first.candidate == "a" {
        (a, b)
    } else {
        (b, a)
    };
    let token = wait_leader(&winner).await;
    assert_eq!(token, first.token);
    assert!(!other.is_leader(), "two leaders at once");
    assert_eq!(other.token(), None);

    within("resign", winner.resign()).await.unwrap();
    let next = wait_leader(&other).await;
    assert!(next.revision > token.revision, "{next} after {token}");
    let seen = wait_until("the view to follow", &mut leader, |l| {
        l.as_ref().is_some_and(|l| l.token == next)
    })
    .await
    .expect("some leader");
    assert_eq!(seen.candidate, other.candidate());

    within("resign", other.resign()).await.unwrap();
    wait_until("no leader", &mut leader, Option::is_none).await;
}

#[tokio::test]
async fn a_crashed_leader_is_replaced_after_its_lease_expires() {
    let etcd = start_etcd();
    let cfg = config(&etcd.endpoint(), "e2");
    let a = Election::campaign(cfg.clone(), "a", Duration::from_secs(2)).unwrap();
    let first = wait_leader(&a).await;
    let b = Election::campaign(cfg.clone(), "b", Duration::from_secs(2)).unwrap();
    assert!(!b.is_leader());

    drop(a); // no resign: the keep-alive stops, as in a crash
    let next = wait_leader(&b).await;
    assert!(next.revision > first.revision);
    let mut leader = watch_leader(cfg).subscribe();
    wait_until("the view to show b", &mut leader, |l| {
        l.as_ref().is_some_and(|l| l.candidate == "b")
    })
    .await;
}

#[tokio::test]
async fn a_deposed_leaders_fenced_writes_are_refused() {
    let etcd = start_etcd();
    let proxy = TcpProxy::start(etcd.addr()).await;
    let cfg = config(&etcd.endpoint(), "e3");
    let etcd_client = EtcdClient::new(cfg.clone());
    let store = PlacementStore::new(etcd_client.clone());
    let mut placement = store.watch_placement().subscribe();

    // a reaches etcd only through the proxy; b directly.
    let a =
        Election::campaign(config(&proxy.endpoint(), "e3"), "a", Duration::from_secs(2)).unwrap();
    let token_a = wait_leader(&a).await;
    let b = Election::campaign(cfg.clone(), "b", Duration::from_secs(2)).unwrap();
    store
        .put_placement(1, &json!({"by": "a"}), &token_a)
        .await
        .unwrap();
    wait_until("placement v1", &mut placement, |p| {
        p.as_ref().is_some_and(|p| p.version == 1)
    })
    .await;

    // a is cut off: its lease expires, b takes over; a steps down on its own side.
    proxy.cut();
    let token_b = wait_leader(&b).await;
    assert!(token_b.revision > token_a.revision);
    wait_until("a to step down", &mut a.leadership(), |l| {
        *l == Leadership::Follower
    })
    .await;

    // a's writes, even when they reach etcd, are refused; b's go through.
    let err = store
        .put_placement(2, &json!({"by": "a"}), &token_a)
        .await
        .unwrap_err();
    assert!(matches!(err, ControlError::Fenced { .. }), "{err}");
    let key = cfg.keys.ready("w0");
    let err = fenced_put(&etcd_client, &key, "1", &token_a)
        .await
        .unwrap_err();
    assert!(matches!(err, ControlError::Fenced { .. }), "{err}");
    fenced_put(&etcd_client, &key, "2", &token_b).await.unwrap();
    store
        .put_placement(2, &json!({"by": "b"}), &token_b)
        .await
        .unwrap();
    let err = store
        .put_placement(2, &json!({"by": "b"}), &token_b)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ControlError::StaleVersion {
                current: 2,
                proposed: 2
            }
        ),
        "{err}"
    );

    let stored = store.get_placement().await.unwrap().expect("a placement");
    assert_eq!((stored.version, stored.placement), (2, json!({"by": "b"})));
    wait_until("placement v2", &mut placement, |p| {
        p.as_ref().is_some_and(|p| p.version == 2)
    })
    .await;

    // a comes back as a follower behind b.
    proxy.heal();
    assert!(b.is_leader());
    within("b to resign", b.resign()).await.unwrap();
    let token_a2 = wait_leader(&a).await;
    assert!(
        token_a2.revision > token_b.revision,
        "a new leadership, a new token"
    );
}
