//! The topic examples of 3.1.1 and 5.0 §4.7.

use herald_mqtt::topic::{matches, parse_shared, validate_filter, validate_name, SharedFilter, TopicError};

#[test]
fn multi_level_wildcard() {
    // §4.7.1.2
    for topic in [
        "sport/tennis/player1",
        "sport/tennis/player1/ranking",
        "sport/tennis/player1/score/wimbledon",
    ] {
        assert!(matches("sport/tennis/player1/#", topic), "{topic}");
    }
    assert!(matches("sport/#", "sport"), "# matches the parent level");
    assert!(!matches("sport/tennis/player1/#", "sport/tennis/player2"));
    assert_eq!(validate_filter("#"), Ok(()));
    assert_eq!(validate_filter("sport/tennis/#"), Ok(()));
    assert_eq!(
        validate_filter("sport/tennis#"),
        Err(TopicError::MisplacedWildcard)
    );
    assert_eq!(
        validate_filter("sport/tennis/#/ranking"),
        Err(TopicError::MisplacedWildcard)
    );
    assert!(matches("#", "sport/tennis"));
    assert!(matches("#", "/"));
}

#[test]
fn single_level_wildcard() {
    // §4.7.1.3
    assert!(matches("sport/tennis/+", "sport/tennis/player1"));
    assert!(matches("sport/tennis/+", "sport/tennis/player2"));
    assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
    assert!(!matches("sport/+", "sport"));
    assert!(matches("sport/+", "sport/"));
    for filter in ["+", "+/tennis/#", "sport/+/player1"] {
        assert_eq!(validate_filter(filter), Ok(()), "{filter}");
    }
    assert_eq!(validate_filter("sport+"), Err(TopicError::MisplacedWildcard));
    assert!(matches("+/+", "/finance"));
    assert!(matches("/+", "/finance"));
    assert!(!matches("+", "/finance"));
}

#[test]
fn topics_beginning_with_dollar() {
    // §4.7.2
    assert!(!matches("#", "$SYS/monitor/Clients"));
    assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
    assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
    assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
    assert!(!matches("+", "$SYS"));
    assert!(matches("$SYS", "$SYS"));
}

#[test]
fn topic_semantics() {
    // §4.7.3
    assert!(!matches("ACCOUNTS", "Accounts"));
    assert_eq!(validate_name("Accounts payable"), Ok(()));
    assert!(matches("Accounts payable", "Accounts payable"));
    assert!(!matches("/finance", "finance"));
    assert_eq!(validate_name(""), Err(TopicError::Empty));
    assert_eq!(validate_filter(""), Err(TopicError::Empty));
    assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
    assert_eq!(validate_name("a/#"), Err(TopicError::WildcardInName));
    assert_eq!(validate_name("a\0"), Err(TopicError::NullCharacter));
    assert_eq!(validate_name(&"a".repeat(65_535)), Ok(()));
    assert_eq!(
        validate_name(&"a".repeat(65_536)),
        Err(TopicError::TooLong(65_536))
    );
}

#[test]
fn shared_subscriptions() {
    // 5.0 §4.8.2
    assert_eq!(
        parse_shared("$share/consumer1/sport/tennis/+"),
        Ok(Some(SharedFilter {
            share_name: "consumer1",
            filter: "sport/tennis/+"
        }))
    );
    assert_eq!(
        parse_shared("$share/consumer1//finance"),
        Ok(Some(SharedFilter {
            share_name: "consumer1",
            filter: "/finance"
        }))
    );
    assert_eq!(
        parse_shared("$share/consumer1"),
        Err(TopicError::SharedWithoutFilter)
    );
    assert_eq!(parse_shared("$share/+/a"), Err(TopicError::InvalidShareName));
    assert_eq!(parse_shared("$share/a#/a"), Err(TopicError::InvalidShareName));
    assert_eq!(parse_shared("sport/tennis"), Ok(None));
}
