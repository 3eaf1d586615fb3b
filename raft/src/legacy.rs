//! Encodings that older versions wrote and this one still reads (the compatibility rule in
//! [`crate::types`]: a struct grows only behind a new variant). Nothing new is written in them.

use serde::{Deserialize, Serialize};

use crate::types::{AppConfig, AppLimits, DevicePolicy};

/// An app as written before [`AppLimits::max_targets`] existed: in `Op::PutAppV1` log entries
/// and in the state machine's app records of that time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppConfigV1 {
    pub id: String,
    pub name: String,
    pub secrets: Vec<String>,
    pub api_keys: Vec<String>,
    pub limits: AppLimitsV1,
    pub policy: DevicePolicy,
    pub callbacks: Vec<String>,
    pub created_ms: u64,
}

/// [`AppLimits`] before `max_targets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppLimitsV1 {
    pub mailbox_cap: u32,
    pub default_ttl_ms: u64,
    pub max_ttl_ms: u64,
    pub topic_retain: u32,
    pub max_payload: u32,
}

/// An app as written before [`AppConfig::client_publish`] existed: in `Op::PutAppV2` log entries
/// and in the state machine's app records of that time (marker `u64::MAX`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppConfigV2 {
    pub id: String,
    pub name: String,
    pub secrets: Vec<String>,
    pub api_keys: Vec<String>,
    pub limits: AppLimits,
    pub policy: DevicePolicy,
    pub callbacks: Vec<String>,
    pub created_ms: u64,
}

impl From<AppConfigV2> for AppConfig {
    /// An old app lets no client publish.
    fn from(a: AppConfigV2) -> Self {
        AppConfig {
            id: a.id,
            name: a.name,
            secrets: a.secrets,
            api_keys: a.api_keys,
            limits: a.limits,
            policy: a.policy,
            callbacks: a.callbacks,
            created_ms: a.created_ms,
            client_publish: Vec::new(),
        }
    }
}

impl From<AppConfigV1> for AppConfig {
    /// An old app gets the standard value of every limit it did not have.
    fn from(a: AppConfigV1) -> Self {
        AppConfig {
            id: a.id,
            name: a.name,
            secrets: a.secrets,
            api_keys: a.api_keys,
            limits: AppLimits {
                mailbox_cap: a.limits.mailbox_cap,
                default_ttl_ms: a.limits.default_ttl_ms,
                max_ttl_ms: a.limits.max_ttl_ms,
                topic_retain: a.limits.topic_retain,
                max_payload: a.limits.max_payload,
                max_targets: AppLimits::STANDARD.max_targets,
            },
            policy: a.policy,
            callbacks: a.callbacks,
            created_ms: a.created_ms,
            client_publish: Vec::new(),
        }
    }
}
