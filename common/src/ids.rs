//! Validated identifiers.
//!
//! Every identifier that arrives from a peer is checked while it is decoded
//! (`serde(try_from = "String")`), so code past the decoder only ever sees
//! well-formed ids.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_ID_LEN, MAX_RESOURCE_ID_LEN};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} bytes long; the limit is {max}")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} {value:?} contains {ch:?}; allowed: {allowed}")]
    BadChar {
        kind: &'static str,
        value: String,
        ch: char,
        allowed: &'static str,
    },
    #[error("{kind} {value:?} must not start or end with '-'")]
    EdgeHyphen { kind: &'static str, value: String },
}

fn check(
    kind: &'static str,
    value: &str,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong {
            kind,
            len: value.len(),
            max,
        });
    }
    if let Some(ch) = value.chars().find(|c| !ok(*c)) {
        return Err(IdError::BadChar {
            kind,
            value: value.to_owned(),
            ch,
            allowed,
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident, $kind:literal, $validate:expr) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                let validate: fn(&str) -> Result<(), IdError> = $validate;
                validate(&value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

const LOWER_DNS: &str = "a-z, 0-9 and '-'";
const NAME_CHARS: &str = "letters, digits and . _ @ + -";

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-')
}

string_id!(
    /// A streaming host. Also a DNS label in the agent's certificate, so it is
    /// lower-case letters, digits and inner hyphens, at most 63 bytes.
    ResourceId,
    "resource id",
    |v| {
        check("resource id", v, MAX_RESOURCE_ID_LEN, LOWER_DNS, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
        })?;
        if v.starts_with('-') || v.ends_with('-') {
            return Err(IdError::EdgeHyphen {
                kind: "resource id",
                value: v.to_owned(),
            });
        }
        Ok(())
    }
);

string_id!(
    /// One end user's streaming session, named by the host's streaming server.
    SessionId,
    "session id",
    |v| check("session id", v, MAX_ID_LEN, NAME_CHARS, name_char)
);

string_id!(
    /// An end user (login name or e-mail address).
    UserId,
    "user id",
    |v| check("user id", v, MAX_ID_LEN, NAME_CHARS, name_char)
);

string_id!(
    /// A delivery group's name.
    GroupName,
    "group name",
    |v| check("group name", v, MAX_ID_LEN, NAME_CHARS, name_char)
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_ids_are_dns_labels() {
        assert!(ResourceId::new("host-01").is_ok());
        assert!(matches!(
            ResourceId::new("Host"),
            Err(IdError::BadChar { ch: 'H', .. })
        ));
        assert!(matches!(
            ResourceId::new("-a"),
            Err(IdError::EdgeHyphen { .. })
        ));
        assert!(matches!(ResourceId::new(""), Err(IdError::Empty { .. })));
        assert!(matches!(
            ResourceId::new("a".repeat(64)),
            Err(IdError::TooLong { .. })
        ));
    }

    #[test]
    fn user_ids_allow_email_addresses() {
        assert!(UserId::new("alice@example.com").is_ok());
        assert!(UserId::new("alice smith").is_err());
    }
}
