//! What the SMART / Health log reports that outlives a connection: each device's
//! lifetime I/O totals (by device name, across reconnects and re-exports) and the
//! appliance's power figures (power-on time, power cycles, unsafe shutdowns).
//!
//! The target owns one [`Health`] and attaches every namespace's device to it as it is
//! served. Persisting the figures across restarts is its owner's business (the
//! appliance saves [`Health::record`] and starts the next run from it); without one,
//! they start at zero with the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bdev::{Bdev, IoTotals, Lifetime};

/// The appliance's power figures, as a controller reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PowerLife {
    /// Seconds powered on (serving), over every run.
    pub power_on_secs: u64,
    /// Starts of the appliance.
    pub power_cycles: u64,
    /// Runs that ended without a clean stop (a crash, `kill -9`, a power loss).
    pub unsafe_shutdowns: u64,
}

/// Lifetime figures of the target's devices and of the appliance.
#[derive(Debug)]
pub struct Health {
    /// Figures at the start of this run.
    power: PowerLife,
    started: Instant,
    devices: Mutex<HashMap<String, Arc<Lifetime>>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(PowerLife::default(), [])
    }
}

impl Health {
    /// Starts from saved figures: the power figures as of this start (the owner has
    /// counted this power cycle and, if the last run did not stop cleanly, the unsafe
    /// shutdown) and each device's totals by name.
    pub fn new(power: PowerLife, devices: impl IntoIterator<Item = (String, IoTotals)>) -> Self {
        Self {
            power,
            started: Instant::now(),
            devices: Mutex::new(
                devices
                    .into_iter()
                    .map(|(name, base)| (name, Lifetime::new(base)))
                    .collect(),
            ),
        }
    }

    /// Counts `bdev`'s I/O in the lifetime totals of its name.
    pub fn attach(&self, bdev: &Bdev) {
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let lifetime = Arc::clone(
            devices
                .entry(bdev.name().to_string())
                .or_insert_with(|| Lifetime::new(IoTotals::default())),
        );
        // A device counts into the first totals it was attached to (re-exported after
        // its name was forgotten, or attached by another target): report and save
        // those under its name.
        if !bdev.keep_lifetime(&lifetime)
            && let Some(own) = bdev.lifetime()
        {
            devices.insert(bdev.name().to_string(), own);
        }
    }

    /// Drops the totals of a device that no longer exists (a deleted volume), so a
    /// new one of the same name starts from zero.
    pub fn forget(&self, name: &str) {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Lifetime totals of the device named `name` (zero if never served).
    pub fn totals(&self, name: &str) -> IoTotals {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|l| l.totals())
            .unwrap_or_default()
    }

    /// Power figures now.
    pub fn power(&self) -> PowerLife {
        PowerLife {
            power_on_secs: self
                .power
                .power_on_secs
                .saturating_add(self.started.elapsed().as_secs()),
            ..self.power
        }
    }

    /// Everything to save: the power figures now and every known device's totals.
    pub fn record(&self) -> (PowerLife, Vec<(String, IoTotals)>) {
        let devices = self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, l)| (name.clone(), l.totals()))
            .collect();
        (self.power(), devices)
    }
}
