//! Moving key-encryption keys between appliances (`ox::transfer`): this appliance's
//! receiver key, one of its keys sealed for another appliance, and a key sealed for
//! this one opened into a key file under the state directory. No key material in the
//! clear crosses the control API or reaches the audit log; a sealed key is given only
//! to root on the local control socket (whoever holds it can choose the receiver).

use std::os::unix::fs::PermissionsExt;

use anyhow::Context;
use ox::transfer::{Receiver, Sealed};
use ox_api::methods as api;

use super::{Service, bucket, check_name};
use crate::refusal::{Refusal, conflict, invalid};

impl Service {
    fn receiver(&self) -> anyhow::Result<Receiver> {
        let path = self.settings.state_dir.join("transfer.key");
        Receiver::load_or_create(&path).with_context(|| format!("{}", path.display()))
    }

    /// `key_receiver`: the public key other appliances seal keys for this one with.
    pub fn key_receiver(&self) -> anyhow::Result<api::ReceiverKey> {
        Ok(api::ReceiverKey {
            appliance: bucket::named(&self.me()),
            public_key: self.receiver()?.public_hex(),
        })
    }

    /// `key_export`: key `name` sealed for the appliance whose receiver key is `to`.
    pub fn key_export(&self, name: &str, to: &str) -> anyhow::Result<api::ExportedKey> {
        let kek = self
            .settings
            .keys
            .iter()
            .find(|k| k.id == name)
            .ok_or_else(|| Refusal::NotFound(format!("no key named {name:?}")))?;
        let sealed = match ox::transfer::seal(kek, to) {
            Ok(s) => s,
            Err(e) => invalid!("to: {e}"),
        };
        self.audit_key_use(
            "export",
            Some(name),
            &format!("sealed for {}", &sealed.to[..16]),
            "ok",
        );
        Ok(api::ExportedKey {
            sealed: serde_json::to_value(&sealed)?,
            check: kek.check_value(),
        })
    }

    /// `key_import`: opens a key sealed for this appliance and keeps it as
    /// `state_dir/keys/NAME.key` (owner-only), for a `[[key]]` section to name.
    pub fn key_import(&self, sealed: &Sealed) -> anyhow::Result<api::ImportedKey> {
        check_name(&sealed.key).context("key")?;
        let kek = match self.receiver()?.open(sealed) {
            Ok(k) => k,
            Err(e) => invalid!("{e}"),
        };
        if let Some(have) = self.settings.keys.iter().find(|k| k.id == kek.id)
            && !have.same_key(&kek)
        {
            conflict!("a different key named {:?} is configured here", kek.id);
        }
        let dir = self.settings.state_dir.join("keys");
        std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("{}", dir.display()))?;
        let path = dir.join(format!("{}.key", kek.id));
        if path.exists() {
            let there = ox::keys::Kek::load(&kek.id, &ox::keys::KekSource::File(path.clone()))
                .with_context(|| format!("{}", path.display()))?;
            if !there.same_key(&kek) {
                conflict!("{} holds a different key", path.display());
            }
        } else {
            ox::transfer::write_private_once(&path, kek.hex().as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            let there = ox::keys::Kek::load(&kek.id, &ox::keys::KekSource::File(path.clone()))
                .with_context(|| format!("{}", path.display()))?;
            if !there.same_key(&kek) {
                conflict!("{} holds a different key", path.display());
            }
        }
        self.audit_key_use("import", Some(&kek.id), &path.display().to_string(), "ok");
        Ok(api::ImportedKey {
            check: kek.check_value(),
            file: path.display().to_string(),
            configured: self.settings.keys.iter().any(|k| k.id == kek.id),
            configure: format!("[[key]]\nname = {:?}\nfile = {:?}\n", kek.id, path),
            key: kek.id,
        })
    }
}
