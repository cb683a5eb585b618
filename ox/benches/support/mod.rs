//! What the OX benches share: arguments and test data, and the clone benches' world.
#![allow(dead_code)]

pub mod sink;
pub mod world;

/// The value after `name` on the command line, or `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |s| s.parse().unwrap())
}

/// Text-like bytes from `seed`: zstd level 1 keeps about 0.7 of them, like much of
/// what volumes hold.
pub fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"etaoinshrdlu cmfwypvbgkqjxz\n.,ETAOINSHRD0123456789"[(x % 50) as usize]
        })
        .collect()
}

/// The credentials of the network test bed's server: `OX_BED_ACCESS` and
/// `OX_BED_SECRET` (`scripts/netem-bed up` prints them), else `access` and `secret`
/// (the S3 test server's).
pub fn bed_credentials(access: &str, secret: &str) -> ox::store::s3::CredentialSource {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    ox::store::s3::CredentialSource::Static {
        access_key: var("OX_BED_ACCESS", access),
        secret_key: var("OX_BED_SECRET", secret),
    }
}
