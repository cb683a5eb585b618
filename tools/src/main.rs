//! `oxctl`, the operator CLI. The control API it talks to arrives with the "appliance
//! daemon" issue; until then it only describes itself.

use clap::Parser;

/// Operator CLI for the OX appliance (not built yet: the control API comes with the
/// appliance daemon).
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    anyhow::bail!("oxctl has no commands yet: the control API arrives with the appliance daemon")
}
