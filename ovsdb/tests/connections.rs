//! The client's connections against real `ovsdb-server`s: reconnecting after a restart, the
//! leader of a RAFT cluster, followers refused, TLS, host names, a silent peer.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_restart_and_resyncs() {
    let mut server = southbound(Listen::default());
    let mut opts = options(&server.unix_remote());
    opts.monitors = vec![MonitorRequest::table("Chassis").columns(&["name"])];
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    server.kill();
    eventually("the client to notice", || !client.is_connected()).await;
    let err = client
        .transact(&[Operation::Comment("x".into())])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotConnected), "{err:?}");
    // Changed while the client was away.
    server.start();
    server.sbctl(&["chassis-add", "ch-new", "geneve", "127.0.0.1"]);
    client.wait_connected(WAIT).await.unwrap();
    eventually("the resync", || client.replica().len("Chassis") == 1).await;
    client
        .transact(&[Operation::Comment("back".into())])
        .await
        .unwrap();
    assert!(
        client
            .stats()
            .disconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_leader_of_a_raft_cluster() {
    let mut cluster = Cluster::start(3, SB_SCHEMA, SB_DB);
    let mut opts = options(&cluster.remotes());
    opts.monitors = vec![MonitorRequest::table("Chassis").columns(&["name"])];
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    let leader = cluster.leader().unwrap();
    let connected_to = |client: &Client| match &*client.status().borrow() {
        ovsdb::Status::Connected(r) => r.to_string(),
        other => panic!("not connected: {other:?}"),
    };
    assert_eq!(
        connected_to(&client),
        cluster.servers[leader].tcp_remote().unwrap()
    );
    client
        .transact(&add_chassis_ops("ch-1", "127.0.0.1"))
        .await
        .unwrap();

    cluster.servers[leader].kill();
    eventually("the client to leave the dead leader", || {
        !client.is_connected()
    })
    .await;
    client.wait_connected(WAIT).await.unwrap();
    let new_leader = cluster.wait_for_leader(WAIT);
    assert_ne!(new_leader, leader);
    eventually("the client to sit on the new leader", || {
        client.is_connected()
            && connected_to(&client) == cluster.servers[new_leader].tcp_remote().unwrap()
    })
    .await;
    client
        .transact(&add_chassis_ops("ch-2", "127.0.0.2"))
        .await
        .unwrap();
    eventually("both rows in the replica", || {
        client.replica().len("Chassis") == 2
    })
    .await;
    assert_eq!(
        cluster
            .sbctl(&["--bare", "--columns=name", "list", "Chassis"])
            .lines()
            .filter(|l| !l.is_empty())
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_is_not_used_for_leader_only_connections() {
    let cluster = Cluster::start(3, SB_SCHEMA, SB_DB);
    let leader = cluster.leader().unwrap();
    let follower = (leader + 1) % 3;
    // Only a follower given: the client must refuse to settle there.
    let client = Client::start(options(&cluster.servers[follower].tcp_remote().unwrap())).unwrap();
    assert!(client.wait_connected(Duration::from_secs(2)).await.is_err());
    assert!(
        client
            .stats()
            .leader_changes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // Without leader-only, a follower is fine.
    let mut opts = options(&cluster.servers[follower].tcp_remote().unwrap());
    opts.leader_only = false;
    let any = Client::start(opts).unwrap();
    any.wait_connected(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_ovs_pki_certificates_and_a_wrong_ca_is_refused() {
    let tmp = TempDir::new("pki");
    let pki = Pki::new(&tmp.0);
    let port = free_port();
    let server = southbound(Listen {
        tcp: None,
        ssl: Some((port, pki.server.clone())),
    });
    let files = |f: &[std::path::PathBuf; 3]| TlsFiles {
        private_key: f[0].clone(),
        certificate: f[1].clone(),
        ca_certificate: f[2].clone(),
    };
    let mut opts = options(&server.ssl_remote().unwrap());
    opts.tls = Some(files(&pki.client));
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    assert!(client.list_dbs().await.unwrap().contains(&SB_DB.to_owned()));

    // A client that trusts another CA must not connect.
    let other_tmp = TempDir::new("pki2");
    let other = Pki::new(&other_tmp.0);
    let mut wrong = files(&pki.client);
    wrong.ca_certificate = other.client[2].clone();
    let mut opts = options(&server.ssl_remote().unwrap());
    opts.tls = Some(wrong);
    let client = Client::start(opts).unwrap();
    assert!(client.wait_connected(Duration::from_secs(2)).await.is_err());
    let status = client.status().borrow().clone();
    assert!(
        matches!(&status, ovsdb::Status::Disconnected(Some(why)) if why.contains("TLS")),
        "{status:?}"
    );
    // Unreadable TLS files are refused up front.
    let mut opts = options(&server.ssl_remote().unwrap());
    opts.tls = Some(TlsFiles {
        private_key: "/nonexistent".into(),
        certificate: "/nonexistent".into(),
        ca_certificate: "/nonexistent".into(),
    });
    assert!(matches!(Client::start(opts), Err(Error::Tls(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_remote_is_resolved() {
    let port = free_port();
    let _server = southbound(Listen {
        tcp: Some(port),
        ssl: None,
    });
    let client = Client::start(options(&format!("tcp:localhost:{port}"))).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    assert!(client.list_dbs().await.unwrap().contains(&SB_DB.to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_accepts_and_never_speaks_does_not_hold_up_the_others() {
    let tmp = TempDir::new("silent");
    let pki = Pki::new(&tmp.0);
    let server = southbound(Listen {
        tcp: None,
        ssl: Some((free_port(), pki.server.clone())),
    });
    // The kernel completes the TCP handshake for a listener that never accepts: the peer
    // "accepts" and never says a word of TLS.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_remote = format!("ssl:{}", silent.local_addr().unwrap());
    let mut opts = options(&format!("{silent_remote},{}", server.ssl_remote().unwrap()));
    opts.tls = Some(TlsFiles {
        private_key: pki.client[0].clone(),
        certificate: pki.client[1].clone(),
        ca_certificate: pki.client[2].clone(),
    });
    opts.connect_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let client = Client::start(opts).unwrap();
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("the second remote must be tried once the first times out");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    drop(silent);
}
