//! The crash loop, per commit: at least 50 cycles of a real `kappakv serve` killed with SIGKILL
//! at random moments under 16 to 64 concurrent writers, each restart checked for every
//! acknowledged write, with full checks (`kappakv verify`, incremental indexes equal to a full
//! rebuild) along the way and at the end. See `kappakv_tests::crash_loop`.
//!
//! `CRASH_LOOP_SEED` (decimal or `0x` hex) replays a seed a failure printed; `CRASH_LOOP_CYCLES`
//! runs more cycles. Long runs: `cargo run --release -p kappakv-tests --bin crash-loop`.

use kappakv_tests::crash::seed_from_env;
use kappakv_tests::crash_loop::{self, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_repeated_sigkill() -> anyhow::Result<()> {
    let seed = seed_from_env("CRASH_LOOP_SEED")?;
    let cycles = match std::env::var("CRASH_LOOP_CYCLES") {
        Ok(n) => n.parse()?,
        Err(_) => 50,
    };
    let report = crash_loop::run(Options::quick(cycles, seed)).await?;
    println!("{report}");
    assert_eq!(report.cycles, cycles);
    assert_eq!(
        report.kills + report.stopped_before_kill,
        cycles,
        "one SIGKILL per cycle"
    );
    assert!(report.kills > report.stopped_before_kill, "{report}");
    assert!(
        report.acked >= cycles,
        "the writers got writes in before the kills: {report}"
    );
    assert!(report.checked >= report.acked);
    assert!(report.full_checks >= 2, "{report}");
    assert!(
        report.segments > 10,
        "the log rolled over to new segments under the kills: {report}"
    );
    Ok(())
}
