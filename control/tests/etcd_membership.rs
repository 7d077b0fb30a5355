//! Membership against a real etcd: registration, lease expiry, revoke, and what happens
//! when etcd is killed or a worker is cut off from it.

mod support;

use std::time::Duration;

use moe_control::{ConnectionState, EtcdRegistry, RegistrationState, Registry};
use support::{config, record, start_etcd, wait_until, within, TcpProxy, DEADLINE};

fn ids(m: &moe_control::Membership) -> Vec<&str> {
    m.keys().map(String::as_str).collect()
}

#[tokio::test]
async fn registration_appears_in_the_watch_and_revoke_removes_it_at_once() {
    let etcd = start_etcd();
    let registry = EtcdRegistry::new(config(&etcd.endpoint(), "m1"));
    let view = registry.watch_workers();
    let mut workers = view.subscribe();

    // A TTL longer than the wait deadline: only the revoke can remove it in time.
    let ttl = DEADLINE * 2;
    let reg = registry.register(record("w0"), ttl).unwrap();
    reg.wait_registered(DEADLINE).await.unwrap();
    assert!(matches!(reg.state(), RegistrationState::Connected { .. }));
    let seen = wait_until("w0 in the watch", &mut workers, |m| m.contains_key("w0")).await;
    assert_eq!(seen["w0"], record("w0"));
    assert!(view.is_connected());

    // A watcher started later gets the initial list.
    let late = registry.watch_workers();
    wait_until("w0 in a late watch", &mut late.subscribe(), |m| {
        m.contains_key("w0")
    })
    .await;

    let mut state = reg.subscribe();
    within("revoke", reg.revoke()).await.unwrap();
    wait_until("w0 gone after revoke", &mut workers, |m| m.is_empty()).await;
    assert_eq!(*state.borrow_and_update(), RegistrationState::Revoked);
}

#[tokio::test]
async fn a_dropped_registration_expires_with_its_lease() {
    let etcd = start_etcd();
    let registry = EtcdRegistry::new(config(&etcd.endpoint(), "m2"));
    let mut workers = registry.watch_workers().subscribe();
    let stays = registry.register(record("stays"), DEADLINE * 2).unwrap();
    let crashes = registry
        .register(record("crashes"), Duration::from_secs(2))
        .unwrap();
    wait_until("both registered", &mut workers, |m| m.len() == 2).await;

    // Dropped without revoke: the keep-alive stops, etcd expires the lease.
    drop(crashes);
    let left = wait_until("the lease to expire", &mut workers, |m| m.len() == 1).await;
    assert_eq!(ids(&left), ["stays"]);
    assert!(stays.state().is_registered());
}

#[tokio::test]
async fn connect_to_an_unreachable_etcd_fails_fast_as_unavailable() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let err = within("connect", EtcdRegistry::connect([endpoint], "m0"))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}

#[tokio::test]
async fn the_watch_keeps_the_last_membership_while_etcd_is_down_then_resyncs() {
    let mut etcd = start_etcd();
    let registry = EtcdRegistry::new(config(&etcd.endpoint(), "m3"));
    let view = registry.watch_workers();
    let mut workers = view.subscribe();
    let mut connection = view.connection();
    let a = registry.register(record("a"), DEADLINE * 2).unwrap();
    let b = registry
        .register(record("b"), Duration::from_secs(2))
        .unwrap();
    wait_until("a and b registered", &mut workers, |m| m.len() == 2).await;

    etcd.kill();
    wait_until("the watch to notice", &mut connection, |c| {
        *c == ConnectionState::Disconnected
    })
    .await;
    wait_until("a's keep-alive to notice", &mut a.subscribe(), |s| {
        *s == RegistrationState::Disconnected
    })
    .await;
    assert_eq!(ids(&view.current()), ["a", "b"], "last membership kept");
    // b crashes while etcd is down: its lease must expire once etcd is back.
    drop(b);

    etcd.restart();
    wait_until("the watch to reconnect", &mut connection, |c| {
        *c == ConnectionState::Connected
    })
    .await;
    a.wait_registered(DEADLINE).await.unwrap();
    let after = wait_until("b to expire after the restart", &mut workers, |m| {
        m.len() == 1
    })
    .await;
    assert_eq!(ids(&after), ["a"]);

    // The re-established watch follows new changes.
    let _c = registry.register(record("c"), DEADLINE * 2).unwrap();
    wait_until("c through the new watch", &mut workers, |m| {
        m.contains_key("c")
    })
    .await;
}

#[tokio::test]
async fn a_worker_cut_off_past_its_ttl_registers_again_and_its_watch_resyncs() {
    let etcd = start_etcd();
    let proxy = TcpProxy::start(etcd.addr()).await;
    let direct = EtcdRegistry::new(config(&etcd.endpoint(), "m4"));
    let cut_off = EtcdRegistry::new(config(&proxy.endpoint(), "m4"));
    let mut seen_by_etcd = direct.watch_workers().subscribe();
    let cut_view = cut_off.watch_workers();
    let mut seen_by_worker = cut_view.subscribe();

    let reg = cut_off
        .register(record("w"), Duration::from_secs(2))
        .unwrap();
    let other = direct.register(record("x"), DEADLINE * 2).unwrap();
    let mut state = reg.subscribe();
    reg.wait_registered(DEADLINE).await.unwrap();
    wait_until("w and x seen through the proxy", &mut seen_by_worker, |m| {
        m.len() == 2
    })
    .await;

    proxy.cut();
    wait_until("keep-alive to fail", &mut state, |s| {
        *s == RegistrationState::Disconnected
    })
    .await;
    wait_until(
        "the cut-off watch to notice",
        &mut cut_view.connection(),
        |c| *c == ConnectionState::Disconnected,
    )
    .await;
    // x leaves and w's lease expires while the worker cannot see etcd.
    other.revoke().await.unwrap();
    let now = wait_until("w's lease to expire in etcd", &mut seen_by_etcd, |m| {
        m.is_empty()
    })
    .await;
    assert!(now.is_empty());
    assert_eq!(
        ids(&cut_view.current()),
        ["w", "x"],
        "the cut-off side keeps its last membership"
    );

    proxy.heal();
    let s = wait_until("registration under a fresh lease", &mut state, |s| {
        matches!(s, RegistrationState::Reregistered { .. })
    })
    .await;
    assert!(
        matches!(s, RegistrationState::Reregistered { times: 1, .. }),
        "{s:?}"
    );
    wait_until("w back in etcd", &mut seen_by_etcd, |m| m.contains_key("w")).await;
    // The resync applies what was missed: x is gone, w is back.
    let resynced = wait_until("the cut-off watch to resync", &mut seen_by_worker, |m| {
        ids(m) == ["w"]
    })
    .await;
    assert_eq!(resynced["w"], record("w"));
    assert!(cut_view.is_connected());
}
