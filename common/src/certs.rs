//! What the broker and the agent both know of an agent certificate's life:
//! how its serial number carries the time it was issued, and when it is due
//! for renewal. Pure arithmetic; parsing the certificate is each side's.
//!
//! Every certificate the broker's CA issues has a 16-byte serial number:
//! the issue time as 8 bytes big-endian Unix milliseconds, then 8 random
//! bytes (the top bit is clear, as the issue time is positive). The broker
//! compares that time with a host's revocation floor ("every certificate of
//! this host issued before T is refused"); `notBefore` cannot serve, as it
//! is set [`CLOCK_SKEW`] early. A certificate whose serial is not of this
//! shape (issued before serials carried the time) falls back to its
//! `notBefore`.

use std::time::Duration;

use crate::wire::UnixMillis;

/// How far before its issue time a certificate's `notBefore` is set, so a
/// peer whose clock is a little behind accepts it at once.
pub const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// Length of a serial number that carries its issue time.
pub const SERIAL_LEN: usize = 16;

/// Earliest issue time a serial is believed to carry (2020-01-01): a serial
/// of another shape whose first bytes happen to decode is taken for none.
const EARLIEST_ISSUE: i64 = 1_577_836_800_000;

/// The serial number of a certificate issued at `issued`: its milliseconds
/// big-endian, then `random` (the caller's 8 random bytes).
pub fn serial_for(issued: UnixMillis, random: [u8; 8]) -> [u8; SERIAL_LEN] {
    let mut out = [0u8; SERIAL_LEN];
    out[..8].copy_from_slice(&issued.0.max(0).to_be_bytes());
    out[8..].copy_from_slice(&random);
    // Positive in DER whatever the random bytes are.
    out[0] &= 0x7f;
    out
}

/// The issue time a serial number carries, given as its big-endian bytes
/// (any leading zero bytes of the DER integer may be there or not); `None`
/// for a serial of another shape.
pub fn issued_at_from_serial(serial: &[u8]) -> Option<UnixMillis> {
    let first = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    let digits = &serial[first..];
    // The issue time fills at least the 6 low bytes of its 8, so the
    // minimal encoding has 14 to 16 bytes.
    if digits.len() > SERIAL_LEN || digits.len() < SERIAL_LEN - 2 {
        return None;
    }
    let mut full = [0u8; SERIAL_LEN];
    full[SERIAL_LEN - digits.len()..].copy_from_slice(digits);
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&full[..8]);
    let ms = i64::from_be_bytes(ms);
    (ms >= EARLIEST_ISSUE).then_some(UnixMillis(ms))
}

/// When a certificate issued at `issued` and valid until `not_after` is
/// due for renewal: when a third of its lifetime is left.
pub fn renewal_due(issued: UnixMillis, not_after: UnixMillis) -> UnixMillis {
    let lifetime = not_after.0.saturating_sub(issued.0).max(0);
    UnixMillis(issued.0.saturating_add(lifetime - lifetime / 3))
}

/// The bounds of a certificate issued at `issued` for `lifetime`:
/// (`notBefore`, `notAfter`), `notBefore` [`CLOCK_SKEW`] early.
pub fn validity(issued: UnixMillis, lifetime: Duration) -> (UnixMillis, UnixMillis) {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    (
        UnixMillis(issued.0.saturating_sub(ms(CLOCK_SKEW))),
        UnixMillis(issued.0.saturating_add(ms(lifetime))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: UnixMillis = UnixMillis(1_780_000_000_123);

    #[test]
    fn a_serial_carries_its_issue_time_and_is_positive() {
        let serial = serial_for(T, [0xff; 8]);
        assert_eq!(serial[0] & 0x80, 0);
        assert_eq!(issued_at_from_serial(&serial), Some(T));
        // As a DER integer's bytes, with or without the leading zeros.
        let trimmed: Vec<u8> = serial.iter().copied().skip_while(|b| *b == 0).collect();
        assert!(trimmed.len() < SERIAL_LEN);
        assert_eq!(issued_at_from_serial(&trimmed), Some(T));
        let mut padded = vec![0u8];
        padded.extend_from_slice(&serial);
        assert_eq!(issued_at_from_serial(&padded), Some(T));
        // The random part does not move the time.
        assert_eq!(issued_at_from_serial(&serial_for(T, [0; 8])), Some(T));
    }

    #[test]
    fn serials_of_other_shapes_carry_no_time() {
        // rcgen's default: 20 bytes of a hash.
        let mut hash = [0x5au8; 20];
        hash[0] &= 0x7f;
        assert_eq!(issued_at_from_serial(&hash), None);
        assert_eq!(issued_at_from_serial(&[1, 2, 3]), None);
        assert_eq!(issued_at_from_serial(&[]), None);
        // 16 bytes whose first 8 decode to a time before 2020.
        assert_eq!(
            issued_at_from_serial(&serial_for(UnixMillis(1_000), [1; 8])),
            None
        );
    }

    #[test]
    fn renewal_is_due_when_a_third_of_the_lifetime_is_left() {
        let day = 86_400_000;
        let due = renewal_due(T, UnixMillis(T.0 + 30 * day));
        assert_eq!(due, UnixMillis(T.0 + 20 * day));
        // Six seconds: due after four.
        assert_eq!(
            renewal_due(T, UnixMillis(T.0 + 6_000)),
            UnixMillis(T.0 + 4_000)
        );
        // Measured from the issue time, not the early notBefore: a fresh
        // short certificate is not due at once.
        let (not_before, not_after) = validity(T, Duration::from_secs(60));
        assert_eq!(not_before, UnixMillis(T.0 - 3_600_000));
        assert_eq!(not_after, UnixMillis(T.0 + 60_000));
        assert!(renewal_due(T, not_after) > T);
        // Already expired, or nonsense bounds: due now.
        assert_eq!(renewal_due(T, UnixMillis(T.0 - 5)), T);
    }
}
