//! `oxperf`, the NVMe/TCP initiator and load generator. Arrives with the "oxperf" issue.

use clap::Parser;

/// NVMe/TCP benchmarking tool (not built yet: arrives with the oxperf issue).
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    anyhow::bail!(
        "oxperf has no workloads yet: the NVMe/TCP initiator arrives with the oxperf issue"
    )
}
