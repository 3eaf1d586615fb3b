//! Topic names, topic filters and how filters match names (3.1.1 §4.7, 5.0 §4.7 and §4.8.2).
//!
//! A topic name is what a PUBLISH is sent to; a topic filter is what a SUBSCRIBE asks for and may
//! hold the wildcards `+` (exactly one level) and `#` (any number of levels, last). Levels are
//! separated by `/`; empty levels are valid (`/a//b`).

/// The longest topic name or filter: a UTF-8 string's two-byte length.
pub const TOPIC_MAX: usize = u16::MAX as usize;

/// The prefix of a shared subscription's filter (5.0 §4.8.2).
pub const SHARE_PREFIX: &str = "$share/";

/// Why a string is not a valid topic name or filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("empty")]
    Empty,
    #[error("{0} bytes, longer than 65535")]
    TooLong(usize),
    #[error("contains U+0000")]
    NullCharacter,
    #[error("a topic name contains a wildcard")]
    WildcardInName,
    #[error("'+' or '#' does not occupy a whole level, or '#' is not the last level")]
    MisplacedWildcard,
    #[error("shared subscription share name is empty or contains '+' or '#'")]
    InvalidShareName,
    #[error("shared subscription without a topic filter")]
    SharedWithoutFilter,
}

fn check_length(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > TOPIC_MAX {
        return Err(TopicError::TooLong(s.len()));
    }
    if s.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

/// Checks a topic name: non-empty, at most 65535 bytes, no U+0000 and no wildcard
/// ([MQTT-4.7.3-1], [MQTT-3.3.2-2]).
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    check_length(name)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter: non-empty, at most 65535 bytes, no U+0000, `+` only as a whole level,
/// `#` only as a whole last level ([MQTT-4.7.1-2], [MQTT-4.7.1-3]). A shared subscription's
/// `$share/...` is checked as a plain filter here; [`parse_shared`] checks its parts.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_length(filter)?;
    check_wildcards(filter)
}

fn check_wildcards(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let ok = match level {
            "+" => true,
            "#" => levels.peek().is_none(),
            _ => !level.contains(['+', '#']),
        };
        if !ok {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// A shared subscription's filter split into its parts: `$share/{share_name}/{filter}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    /// Non-empty, without `/`, `+` or `#` ([MQTT-4.8.2-1], [MQTT-4.8.2-2]).
    pub share_name: &'a str,
    /// The filter matched against topic names.
    pub filter: &'a str,
}

/// Splits a shared subscription's filter (MQTT 5.0): `Ok(None)` if `filter` does not start with
/// `$share/`, an error if it does but the share name is invalid or no valid filter follows it.
pub fn parse_shared(filter: &str) -> Result<Option<SharedFilter<'_>>, TopicError> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return Ok(None);
    };
    let Some((share_name, filter)) = rest.split_once('/') else {
        return Err(TopicError::SharedWithoutFilter);
    };
    if share_name.is_empty() || share_name.contains(['+', '#']) {
        return Err(TopicError::InvalidShareName);
    }
    if filter.is_empty() {
        return Err(TopicError::SharedWithoutFilter);
    }
    validate_filter(filter)?;
    Ok(Some(SharedFilter { share_name, filter }))
}

/// Whether the (non-shared) topic filter `filter` matches the topic name `topic` (§4.7).
///
/// `#` matches its parent level too (`sport/#` matches `sport`); a topic name beginning with `$`
/// is not matched by a filter beginning with a wildcard ([MQTT-4.7.2-1]). An invalid filter or
/// topic name matches nothing; pass a shared subscription's [`SharedFilter::filter`], not the
/// whole `$share/...` string.
pub fn matches(filter: &str, topic: &str) -> bool {
    if filter.is_empty() || topic.is_empty() || topic.contains(['+', '#']) {
        return false;
    }
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/').peekable();
    let mut topic_levels = topic.split('/');
    while let Some(f) = filter_levels.next() {
        match f {
            "#" => return filter_levels.peek().is_none(),
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            _ if f.contains(['+', '#']) => return false,
            _ => {
                if topic_levels.next() != Some(f) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_filters_match_nothing() {
        assert!(!matches("a/#/b", "a/x/b"));
        assert!(!matches("a+", "a+"));
        assert!(!matches("a/b#", "a/b#"));
        assert!(!matches("", ""));
        assert!(matches("a/+/c", "a//c"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(!matches("a/b", "a"));
    }

    #[test]
    fn share_names() {
        assert_eq!(
            parse_shared("$share/g/a/+"),
            Ok(Some(SharedFilter {
                share_name: "g",
                filter: "a/+"
            }))
        );
        assert_eq!(parse_shared("$share//a"), Err(TopicError::InvalidShareName));
        assert_eq!(parse_shared("$share/g+/a"), Err(TopicError::InvalidShareName));
        assert_eq!(parse_shared("$share/g"), Err(TopicError::SharedWithoutFilter));
        assert_eq!(parse_shared("$share/g/"), Err(TopicError::SharedWithoutFilter));
        assert_eq!(parse_shared("$shared/g/a"), Ok(None));
        assert_eq!(parse_shared("$share/g/a/#x"), Err(TopicError::MisplacedWildcard));
        assert!(parse_shared("$share/g/#").unwrap().is_some());
        // Before MQTT 5.0 it is just a filter.
        assert_eq!(validate_filter("$share/g"), Ok(()));
    }
}
