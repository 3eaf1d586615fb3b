//! The subscriptions of an MQTT connection as the translator tracks them: each filter with the
//! options of its SUBSCRIBE, restored from WELCOME when a persistent session continues. They
//! decide what the retain flag does: whether a SUBSCRIBE asks for the retained messages (Retain
//! Handling, 5.0 §3.8.3.1) and whether a live message keeps its RETAIN flag (Retain As
//! Published). The node holds the subscriptions themselves; this is the translator's copy.

use herald_mqtt::{RetainHandling, SubscriptionOptions, Version};
use herald_proto::client as pc;

use super::{BROADCAST, BROADCAST_TOPIC};

/// Most filters tracked: the node's limit of topics per session (it refuses more) and the
/// broadcast. A client sending more is not tracked past it (its SUBSCRIBE is refused anyway), so
/// the list stays bounded whatever the client sends.
const MAX_FILTERS: usize = crate::room::MAX_TOPICS_PER_SESSION + 1;

/// A session's filters and their options, in the order they were made.
#[derive(Default)]
pub(super) struct Filters {
    list: Vec<(String, SubscriptionOptions)>,
}

impl Filters {
    /// Records a subscription (replacing the options of the same filter); returns whether the
    /// filter was subscribed before.
    pub(super) fn insert(&mut self, filter: &str, options: SubscriptionOptions) -> bool {
        match self.list.iter_mut().find(|(f, _)| f == filter) {
            Some((_, o)) => {
                *o = options;
                true
            }
            None => {
                if self.list.len() < MAX_FILTERS {
                    self.list.push((filter.to_string(), options));
                }
                false
            }
        }
    }

    pub(super) fn remove(&mut self, filter: &str) {
        self.list.retain(|(f, _)| f != filter);
        if self.list.is_empty() {
            self.list = Vec::new();
        }
    }

    /// Takes in the subscriptions a persistent session continues with (WELCOME): the node's
    /// topic `*` is the client's `$herald/broadcast`. Returns whether the broadcast is among them.
    /// Options a 5.0 client could not have sent (kept by a 3.1.1 connection of the client id) are
    /// read as 3.1.1's; unreadable ones as QoS 0 with no 5.0 option.
    pub(super) fn restore(&mut self, kept: &[pc::KeptSubscription], version: Version) -> bool {
        let mut broadcast = false;
        for k in kept {
            let options = decode_options(k.options, version);
            if k.topic == BROADCAST {
                broadcast = true;
                self.insert(BROADCAST_TOPIC, options);
            } else {
                self.insert(&k.topic, options);
            }
        }
        broadcast
    }

    /// Whether a live message on `topic` its publisher retained keeps RETAIN 1 for this client:
    /// a subscription matching it asked for Retain As Published (5.0). The node sends a message
    /// once per matching subscription but does not say which one, so any matching one counts.
    pub(super) fn retain_as_published(&self, topic: &str) -> bool {
        self.list
            .iter()
            .any(|(f, o)| o.retain_as_published && herald_mqtt::topic::matches(f, topic))
    }

    #[cfg(test)]
    pub(super) fn filters(&self) -> Vec<&str> {
        self.list.iter().map(|(f, _)| f.as_str()).collect()
    }
}

/// Whether a SUBSCRIBE of a filter sends the retained messages it matches: always in 3.1.1;
/// in 5.0 by its Retain Handling (1: only when the filter was not subscribed already).
pub(super) fn wants_retained(options: &SubscriptionOptions, existed: bool) -> bool {
    match options.retain_handling {
        RetainHandling::SendAtSubscribe => true,
        RetainHandling::SendAtNewSubscribe => !existed,
        RetainHandling::DoNotSend => false,
    }
}

/// The options as the node keeps them (`Subscribe.options`): the Subscription Options byte.
pub(super) fn encode_options(options: &SubscriptionOptions) -> u32 {
    u32::from(options.byte())
}

fn decode_options(kept: u32, version: Version) -> SubscriptionOptions {
    u8::try_from(kept)
        .ok()
        .and_then(|b| {
            SubscriptionOptions::from_byte(b, version)
                .or_else(|_| SubscriptionOptions::from_byte(b & 0b11, version))
                .ok()
        })
        .unwrap_or_else(|| SubscriptionOptions::new(herald_mqtt::QoS::AtMostOnce))
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_mqtt::QoS;

    fn opts(rap: bool, rh: RetainHandling) -> SubscriptionOptions {
        SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: rap,
            retain_handling: rh,
        }
    }

    #[test]
    fn retain_handling_decides_what_a_subscribe_sends() {
        let send = |rh, existed| wants_retained(&opts(false, rh), existed);
        assert!(send(RetainHandling::SendAtSubscribe, false));
        assert!(send(RetainHandling::SendAtSubscribe, true));
        assert!(send(RetainHandling::SendAtNewSubscribe, false));
        assert!(!send(RetainHandling::SendAtNewSubscribe, true));
        assert!(!send(RetainHandling::DoNotSend, false));
        // 3.1.1's options byte reads as Retain Handling 0: always sent.
        let v311 = SubscriptionOptions::from_byte(1, Version::V311).unwrap();
        assert!(wants_retained(&v311, true));
    }

    #[test]
    fn options_round_trip_through_the_kept_form_and_restore() {
        let mut f = Filters::default();
        let o = opts(true, RetainHandling::SendAtNewSubscribe);
        let kept = vec![
            pc::KeptSubscription {
                topic: "sport/+".into(),
                options: encode_options(&o),
            },
            pc::KeptSubscription {
                topic: BROADCAST.into(),
                options: encode_options(&opts(false, RetainHandling::DoNotSend)),
            },
            // Not a byte: read as QoS 0, no option.
            pc::KeptSubscription {
                topic: "odd".into(),
                options: 0x1_0000,
            },
        ];
        assert!(f.restore(&kept, Version::V5));
        assert_eq!(f.filters(), vec!["sport/+", BROADCAST_TOPIC, "odd"]);
        assert!(f.retain_as_published("sport/tennis"));
        assert!(!f.retain_as_published("weather"));
        // Subscribing again replaces the options and says the filter existed.
        assert!(f.insert("sport/+", opts(false, RetainHandling::SendAtSubscribe)));
        assert!(!f.retain_as_published("sport/tennis"));
        assert!(!f.insert("new", o));
        f.remove("new");
        assert_eq!(f.filters(), vec!["sport/+", BROADCAST_TOPIC, "odd"]);
        // Bounded, whatever the client sends.
        for i in 0..1000 {
            f.insert(&format!("f{i}"), o);
        }
        assert_eq!(f.list.len(), MAX_FILTERS);
        // A 5.0 options byte restored on a 3.1.1 connection keeps its QoS.
        let mut g = Filters::default();
        g.restore(&kept[..1], Version::V311);
        assert!(!g.retain_as_published("sport/tennis"));
    }
}
