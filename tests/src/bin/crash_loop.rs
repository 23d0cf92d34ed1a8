//! The crash loop for long runs: the harness of `tests/tests/crash_loop.rs`
//! (`kappakv_tests::crash_loop`) for as many cycles as asked.
//!
//! ```text
//! cargo run --release -p kappakv-tests --bin crash-loop -- --cycles 500
//! ```
//!
//! Each cycle starts `kappakv serve` on the same data dir, runs 16 to 64 concurrent writers of
//! unique keys, SIGKILLs the node at a random moment and checks every acknowledged write after
//! the restart; every `--check-every` cycles and at the end the node stops cleanly, `kappakv
//! verify` runs and its indexes are compared with a full rebuild. The `kappakv` binary is built
//! next to this one (same profile) first.
//!
//! Options: `--cycles N` (500), `--seed S` (decimal or `0x` hex; default from the clock; the
//! seed is printed first), `--check-every N` (50), `--load-ms N` (the kill lands within N ms of
//! the writers starting; 100), `--writers MIN-MAX` (16-64), `--segment-bytes N` (4096),
//! `--dir DIR` (where the data dir goes; kept after a failure), `--progress N` (a line every N
//! cycles; 10).

use anyhow::{Context as _, Result, bail};
use kappakv_tests::crash::{clock_seed, parse_seed};
use kappakv_tests::crash_loop::{self, Options};

fn parse_args() -> Result<Options> {
    let mut opts = Options {
        check_every: 50,
        load_ms_max: 100,
        progress_every: 10,
        ..Options::quick(500, clock_seed())
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--cycles" => opts.cycles = value()?.parse()?,
            "--seed" => opts.seed = parse_seed(&value()?)?,
            "--check-every" => opts.check_every = value()?.parse()?,
            "--load-ms" => opts.load_ms_max = value()?.parse()?,
            "--writers" => {
                let v = value()?;
                let (lo, hi) = v.split_once('-').context("--writers takes MIN-MAX")?;
                (opts.writers_min, opts.writers_max) = (lo.parse()?, hi.parse()?);
                if opts.writers_min == 0 || opts.writers_min > opts.writers_max {
                    bail!("--writers {v}: need 1 <= MIN <= MAX");
                }
            }
            "--segment-bytes" => opts.segment_bytes_max = value()?.parse()?,
            "--dir" => opts.dir = Some(value()?.into()),
            "--progress" => opts.progress_every = value()?.parse()?,
            "-h" | "--help" => {
                println!(
                    "crash-loop [--cycles N] [--seed S] [--check-every N] [--load-ms N] \
                     [--writers MIN-MAX] [--segment-bytes N] [--dir DIR] [--progress N]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if opts.cycles == 0 {
        bail!("--cycles must be positive");
    }
    Ok(opts)
}

#[tokio::main]
async fn main() -> Result<()> {
    let opts = parse_args()?;
    // Built (or brought up to date) before the clock starts.
    kappakv_tests::binary("kappakv")?;
    let report = crash_loop::run(opts).await?;
    println!("{report}");
    Ok(())
}
