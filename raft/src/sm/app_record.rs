//! The value of an app record (column family `apps`): a marker, then the bincode of
//! [`AppConfig`] (`MARKER_V3`) or of the older [`AppConfigV2`] (`MARKER`). Records written before
//! any marker existed are an [`AppConfigV1`] alone; they begin with the length of the app id (at
//! most 64), never with a marker, so the first eight bytes tell the three apart.

use super::keys::Cf;
use super::txn::{decode, encode};
use crate::error::StoreError;
use crate::legacy::{AppConfigV1, AppConfigV2};
use crate::types::AppConfig;

/// First eight bytes of an app record of the [`AppConfigV2`] shape (a bincode u64, little endian).
const MARKER: u64 = u64::MAX;
/// First eight bytes of a current app record.
const MARKER_V3: u64 = u64::MAX - 1;

pub(crate) fn encode_app(app: &AppConfig) -> Result<Vec<u8>, StoreError> {
    encode(&(MARKER_V3, app))
}

pub(crate) fn decode_app(key: &[u8], bytes: &[u8]) -> Result<AppConfig, StoreError> {
    if bytes.starts_with(&MARKER_V3.to_le_bytes()) {
        let (_, app): (u64, AppConfig) = decode(Cf::Apps, key, bytes)?;
        Ok(app)
    } else if bytes.starts_with(&MARKER.to_le_bytes()) {
        let (_, app): (u64, AppConfigV2) = decode(Cf::Apps, key, bytes)?;
        Ok(app.into())
    } else {
        decode::<AppConfigV1>(Cf::Apps, key, bytes).map(AppConfig::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::AppLimitsV1;
    use crate::types::{AppLimits, DevicePolicy};

    fn old_app() -> AppConfigV1 {
        AppConfigV1 {
            id: "a".repeat(64),
            name: "old".into(),
            secrets: vec!["s".repeat(16)],
            api_keys: vec!["k".repeat(16)],
            limits: AppLimitsV1 {
                mailbox_cap: 7,
                default_ttl_ms: 1000,
                max_ttl_ms: 2000,
                topic_retain: 9,
                max_payload: 512,
            },
            policy: DevicePolicy {
                max_per_platform: 1,
                max_per_user: 2,
            },
            callbacks: vec!["127.0.0.1:9".into()],
            created_ms: 42,
        }
    }

    #[test]
    fn a_record_written_before_max_targets_reads_with_the_standard_value() {
        let bytes = bincode::serialize(&old_app()).unwrap();
        let app = decode_app(b"k", &bytes).unwrap();
        assert_eq!(app.limits.max_targets, AppLimits::STANDARD.max_targets);
        assert_eq!((app.limits.mailbox_cap, app.limits.max_payload), (7, 512));
        assert_eq!((app.created_ms, app.callbacks.len()), (42, 1));
    }

    #[test]
    fn a_current_record_round_trips() {
        let mut app = AppConfig::from(old_app());
        app.limits.max_targets = 3;
        let bytes = encode_app(&app).unwrap();
        assert_eq!(decode_app(b"k", &bytes).unwrap(), app);
    }

    fn v2_app() -> AppConfigV2 {
        let a = AppConfig::from(old_app());
        AppConfigV2 {
            id: a.id,
            name: a.name,
            secrets: a.secrets,
            api_keys: a.api_keys,
            limits: a.limits,
            policy: a.policy,
            callbacks: a.callbacks,
            created_ms: a.created_ms,
        }
    }

    #[test]
    fn a_record_written_before_client_publish_reads_with_none() {
        let bytes = bincode::serialize(&(MARKER, v2_app())).unwrap();
        let app = decode_app(b"k", &bytes).unwrap();
        assert!(app.client_publish.is_empty());
        assert_eq!(app, AppConfig::from(v2_app()));
    }

    #[test]
    fn a_record_with_client_publish_round_trips() {
        let mut app = AppConfig::from(v2_app());
        app.client_publish = vec!["chat/+".into(), "rooms/#".into()];
        let bytes = encode_app(&app).unwrap();
        assert_eq!(decode_app(b"k", &bytes).unwrap(), app);
    }

    #[test]
    fn a_put_app_log_entry_written_before_client_publish_still_decodes() {
        // PutApp was variant 14 (after ArchiveDone) until client_publish: PutAppV2 took its index.
        let bytes = bincode::serialize(&crate::types::Op::PutAppV2(v2_app())).unwrap();
        assert_eq!(
            &bytes[..4],
            &14u32.to_le_bytes(),
            "PutAppV2 kept PutApp's old index"
        );
        let op: crate::types::Op = bincode::deserialize(&bytes).unwrap();
        assert!(matches!(op, crate::types::Op::PutAppV2(a) if a == v2_app()));
    }

    #[test]
    fn an_old_put_app_log_entry_still_decodes() {
        let bytes = bincode::serialize(&crate::types::Op::PutAppV1(old_app())).unwrap();
        assert_eq!(
            &bytes[..4],
            &0u32.to_le_bytes(),
            "PutAppV1 kept the first variant index"
        );
        let op: crate::types::Op = bincode::deserialize(&bytes).unwrap();
        assert!(matches!(op, crate::types::Op::PutAppV1(a) if a == old_app()));
    }
}
