//! Replication metrics, with a Prometheus recorder installed in this test process (the library
//! only emits; without a recorder its metric calls do nothing).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use kappakv_tests::{TestNode, metric};
use metrics_exporter_prometheus::PrometheusBuilder;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_report_connection_traffic_and_lag() -> Result<()> {
    let recorder = PrometheusBuilder::new().install_recorder()?;
    let a = TestNode::start().await?;
    let b = TestNode::start().await?;
    let (ca, cb) = (a.client().await?, b.client().await?);
    ca.peer_add(b.server.node_id(), b.server.addr().to_string())
        .await?;
    cb.peer_add(a.server.node_id(), a.server.addr().to_string())
        .await?;
    const PUTS: usize = 50;
    for i in 0..PUTS {
        ca.put(format!("k{i}"), "v").await?;
    }
    let (a_id, b_id) = (a.server.node_id(), b.server.node_id());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        kappakv_server::telemetry::refresh(a.server.node());
        kappakv_server::telemetry::refresh(b.server.node());
        let page = recorder.render();
        let received = metric(
            &page,
            &format!("kappakv_peer_entries_received_total{{peer=\"{a_id}\"}}"),
        );
        let sent = metric(
            &page,
            &format!("kappakv_peer_entries_sent_total{{peer=\"{b_id}\"}}"),
        );
        let lag = metric(
            &page,
            &format!("kappakv_peer_they_lack_entries{{peer=\"{b_id}\"}}"),
        );
        if received >= PUTS as f64 && sent >= PUTS as f64 && lag < 0.5 {
            assert!(
                metric(&page, &format!("kappakv_peer_connected{{peer=\"{b_id}\"}}")) > 0.5,
                "{page}"
            );
            assert!(
                metric(
                    &page,
                    &format!("kappakv_peer_connects_total{{peer=\"{a_id}\"}}")
                ) >= 1.0,
                "{page}"
            );
            assert!(
                metric(
                    &page,
                    r#"kappakv_log_entries_appended_total{origin="remote"}"#
                ) >= PUTS as f64,
                "{page}"
            );
            assert!(page.contains("kappakv_equivocations_total 0"), "{page}");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("replication metrics did not reach {PUTS} entries: {page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
