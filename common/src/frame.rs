//! Framing: a connection preamble, then length-prefixed bincode frames.
//!
//! A connection starts with an 8-byte [`preamble`] (magic and protocol
//! version) answered by a [`PreambleReply`]. Their layout never changes, so a
//! peer of any version can read why it was refused. After that, every message
//! is a frame: a 4-byte big-endian length, then that many bytes of bincode.
//! The length is checked against the caller's maximum before any allocation,
//! and decoding runs with the same byte limit.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::limits::{MAX_FRAME_LEN, MAX_PREAMBLE_MESSAGE_LEN};

/// First bytes of every Ferry connection.
pub const MAGIC: [u8; 6] = *b"FERRY\0";

/// Length of the preamble: [`MAGIC`] then the protocol version (u16, big-endian).
pub const PREAMBLE_LEN: usize = 8;

/// Length of the frame header (u32, big-endian).
pub const HEADER_LEN: usize = 4;

/// The bincode configuration of every frame, decoding at most `LIMIT` bytes.
/// Part of the wire format: changing it changes every encoding (the
/// golden-byte tests in `wire` catch that). The limit does not change the
/// bytes, only what a decoder accepts.
fn config<const LIMIT: usize>() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<LIMIT>()
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("malformed frame: {0}")]
    Decode(String),
    #[error("frame has {0} bytes after the message")]
    TrailingBytes(usize),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("not a Ferry peer (bad preamble)")]
    BadMagic,
    #[error("malformed preamble reply")]
    BadPreambleReply,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes a message to a bare payload (no length prefix).
pub fn encode_payload<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    bincode::serde::encode_to_vec(msg, config::<MAX_FRAME_LEN>())
        .map_err(|e| FrameError::Encode(e.to_string()))
}

/// Encodes a message to a whole frame: length prefix and payload.
pub fn encode_frame<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let payload = encode_payload(msg)?;
    if payload.len() > max {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max,
        });
    }
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        max,
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a payload of the agent link ([`MAX_FRAME_LEN`]); the whole payload
/// must be one message.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    decode_payload_within::<T, MAX_FRAME_LEN>(payload)
}

/// Decodes a payload of at most `LIMIT` bytes, with the decoder held to the
/// same limit; the whole payload must be one message.
pub fn decode_payload_within<T: DeserializeOwned, const LIMIT: usize>(
    payload: &[u8],
) -> Result<T, FrameError> {
    if payload.len() > LIMIT {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: LIMIT,
        });
    }
    let (msg, used) = bincode::serde::decode_from_slice(payload, config::<LIMIT>())
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - used));
    }
    Ok(msg)
}

/// Reads one frame's payload. `Ok(None)` is a clean end of stream before a
/// frame started; an end in the middle of a frame is [`FrameError::Truncated`].
/// The length is checked against `max` before the buffer is allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = r.read(&mut header[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        filled += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(Some(payload))
}

/// Reads and decodes one message. `Ok(None)` on a clean end of stream.
pub async fn read_message<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<T>, FrameError> {
    match read_frame(r, max).await? {
        Some(payload) => decode_payload(&payload).map(Some),
        None => Ok(None),
    }
}

/// Reads and decodes one message of at most `LIMIT` bytes (a channel whose
/// limit is above the agent link's, such as the admin socket). `Ok(None)` on
/// a clean end of stream.
pub async fn read_message_within<T: DeserializeOwned, R: AsyncRead + Unpin, const LIMIT: usize>(
    r: &mut R,
) -> Result<Option<T>, FrameError> {
    match read_frame(r, LIMIT).await? {
        Some(payload) => decode_payload_within::<T, LIMIT>(&payload).map(Some),
        None => Ok(None),
    }
}

/// Encodes and writes one message as a frame.
pub async fn write_message<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
    max: usize,
) -> Result<(), FrameError> {
    let frame = encode_frame(msg, max)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// The connection preamble: [`MAGIC`] and the sender's protocol version.
pub fn preamble(version: u16) -> [u8; PREAMBLE_LEN] {
    let mut out = [0u8; PREAMBLE_LEN];
    out[..6].copy_from_slice(&MAGIC);
    out[6..].copy_from_slice(&version.to_be_bytes());
    out
}

/// Checks the magic and returns the peer's protocol version.
pub fn parse_preamble(bytes: &[u8; PREAMBLE_LEN]) -> Result<u16, FrameError> {
    if bytes[..6] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    Ok(u16::from_be_bytes([bytes[6], bytes[7]]))
}

/// The answer to a preamble. Layout, fixed forever: status (u8: 0 accepted,
/// 1 unsupported version), the answering side's version (u16 BE), message
/// length (u16 BE), message (UTF-8, at most [`MAX_PREAMBLE_MESSAGE_LEN`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreambleReply {
    Accepted { version: u16 },
    UnsupportedVersion { supported: u16, message: String },
}

/// The broker refused a client's protocol version: the version it speaks
/// and its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionRefused {
    pub supported: u16,
    pub message: String,
}

/// The part of a preamble reply's message that is sent: at most
/// [`MAX_PREAMBLE_MESSAGE_LEN`] bytes, cut on a character boundary.
fn preamble_message(message: &str) -> &str {
    let mut end = message.len().min(MAX_PREAMBLE_MESSAGE_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

impl PreambleReply {
    /// Reads the broker's reply to a client's preamble: `Ok(Ok(()))` when
    /// accepted, `Ok(Err(..))` with the version it speaks when refused. Every
    /// client of the broker (agent link, enrollment, routing) starts so.
    pub async fn expect_accepted<R: AsyncRead + Unpin>(
        r: &mut R,
    ) -> Result<Result<(), VersionRefused>, FrameError> {
        Ok(match Self::read(r).await? {
            PreambleReply::Accepted { .. } => Ok(()),
            PreambleReply::UnsupportedVersion { supported, message } => {
                Err(VersionRefused { supported, message })
            }
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let (status, version, message) = match self {
            PreambleReply::Accepted { version } => (0u8, *version, ""),
            PreambleReply::UnsupportedVersion { supported, message } => {
                (1u8, *supported, message.as_str())
            }
        };
        let message = preamble_message(message).as_bytes();
        let mut out = Vec::with_capacity(5 + message.len());
        out.push(status);
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&(message.len() as u16).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, FrameError> {
        let mut head = [0u8; 5];
        r.read_exact(&mut head).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                FrameError::Truncated
            } else {
                FrameError::Io(e)
            }
        })?;
        let version = u16::from_be_bytes([head[1], head[2]]);
        let len = u16::from_be_bytes([head[3], head[4]]) as usize;
        if len > MAX_PREAMBLE_MESSAGE_LEN {
            return Err(FrameError::BadPreambleReply);
        }
        let mut message = vec![0u8; len];
        r.read_exact(&mut message)
            .await
            .map_err(|_| FrameError::Truncated)?;
        // Invalid UTF-8 is replaced, which can make the text longer than
        // what was read: it is bounded again, so a reply read is one that
        // encodes to itself.
        let message = preamble_message(&String::from_utf8_lossy(&message)).to_owned();
        match head[0] {
            0 => Ok(PreambleReply::Accepted { version }),
            1 => Ok(PreambleReply::UnsupportedVersion {
                supported: version,
                message,
            }),
            _ => Err(FrameError::BadPreambleReply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AgentMessage, BrokerMessage};
    use proptest::prelude::*;

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocation() {
        let mut bytes: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        let err = read_frame(&mut bytes, MAX_FRAME_LEN).await.unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 0xffff_ffff,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn truncated_frames_are_errors_and_clean_eof_is_none() {
        let mut empty: &[u8] = &[];
        assert!(read_frame(&mut empty, 16).await.expect("eof").is_none());
        let mut half_header: &[u8] = &[0, 0];
        assert!(matches!(
            read_frame(&mut half_header, 16).await,
            Err(FrameError::Truncated)
        ));
        let mut short_body: &[u8] = &[0, 0, 0, 4, 1, 2];
        assert!(matches!(
            read_frame(&mut short_body, 16).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn round_trip_through_a_stream() {
        let msg = BrokerMessage::V1(crate::wire::BrokerToAgent::Ack { up_to: 9 });
        let mut buf = Vec::new();
        write_message(&mut buf, &msg, MAX_FRAME_LEN)
            .await
            .expect("write");
        let mut r: &[u8] = &buf;
        let back: BrokerMessage = read_message(&mut r, MAX_FRAME_LEN)
            .await
            .expect("read")
            .expect("one frame");
        assert_eq!(back, msg);
    }

    #[tokio::test]
    async fn a_larger_channel_limit_is_honoured_by_the_decoder() {
        // A message above the agent link's limit: the link refuses it, a channel
        // with a larger limit (the admin socket) reads it whole.
        let big = "x".repeat(MAX_FRAME_LEN + 10);
        let payload = encode_payload(&big).expect("encode");
        assert!(matches!(
            decode_payload::<String>(&payload),
            Err(FrameError::TooLarge { .. })
        ));
        const LARGER: usize = 2 * MAX_FRAME_LEN;
        let frame = encode_frame(&big, LARGER).expect("frame");
        let mut r: &[u8] = &frame;
        let back: String = read_message_within::<String, _, LARGER>(&mut r)
            .await
            .expect("read")
            .expect("one frame");
        assert_eq!(back, big);
        // And the larger limit still bounds it.
        let mut r: &[u8] = &frame;
        assert!(matches!(
            read_message_within::<String, _, MAX_FRAME_LEN>(&mut r).await,
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let msg = BrokerMessage::V1(crate::wire::BrokerToAgent::Ack { up_to: 9 });
        let mut payload = encode_payload(&msg).expect("encode");
        payload.push(0);
        assert!(matches!(
            decode_payload::<BrokerMessage>(&payload),
            Err(FrameError::TrailingBytes(1))
        ));
    }

    #[test]
    fn preamble_round_trip() {
        assert_eq!(parse_preamble(&preamble(1)).expect("ok"), 1);
        let mut bad = preamble(1);
        bad[0] = b'X';
        assert!(matches!(parse_preamble(&bad), Err(FrameError::BadMagic)));
    }

    #[tokio::test]
    async fn preamble_reply_round_trip() {
        for reply in [
            PreambleReply::Accepted { version: 1 },
            PreambleReply::UnsupportedVersion {
                supported: 1,
                message: "broker speaks protocol 1, agent sent 9".into(),
            },
        ] {
            let bytes = reply.encode();
            let mut r: &[u8] = &bytes;
            assert_eq!(PreambleReply::read(&mut r).await.expect("read"), reply);
        }
    }

    /// A message of invalid UTF-8 grows when it is read (each bad byte
    /// becomes U+FFFD): it is bounded again, so what is read encodes to
    /// itself (a libFuzzer finding, kept in tests/fuzz/regressions).
    #[tokio::test]
    async fn a_reply_read_from_invalid_utf8_stays_within_the_limit() {
        let mut bytes = vec![1u8, 0, 1];
        bytes.extend_from_slice(&(MAX_PREAMBLE_MESSAGE_LEN as u16).to_be_bytes());
        bytes.extend(std::iter::repeat_n(0xffu8, MAX_PREAMBLE_MESSAGE_LEN));
        let mut r: &[u8] = &bytes;
        let reply = PreambleReply::read(&mut r).await.expect("read");
        let PreambleReply::UnsupportedVersion { message, .. } = &reply else {
            panic!("expected a refusal, got {reply:?}");
        };
        assert!(
            message.len() <= MAX_PREAMBLE_MESSAGE_LEN,
            "{}",
            message.len()
        );
        let again = reply.encode();
        let mut r: &[u8] = &again;
        assert_eq!(PreambleReply::read(&mut r).await.expect("read"), reply);
    }

    proptest! {
        // Random and truncated bytes never panic the decoder.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_payload::<AgentMessage>(&bytes);
            let _ = decode_payload::<BrokerMessage>(&bytes);
        }

        #[test]
        fn truncated_valid_messages_are_errors(cut in 0usize..40) {
            let msg = AgentMessage::V1(crate::wire::AgentToBroker::Session(crate::wire::SequencedEvent {
                seq: 12345,
                event: crate::wire::SessionEvent::Ended {
                    session: "sess-1".parse().expect("id"),
                    at: crate::wire::UnixMillis(1_700_000_000_000),
                    reason: crate::wire::EndReason::Other("gone".into()),
                },
            }));
            let bytes = encode_payload(&msg).expect("encode");
            let cut = cut.min(bytes.len().saturating_sub(1));
            prop_assert!(decode_payload::<AgentMessage>(&bytes[..cut]).is_err());
        }
    }
}
