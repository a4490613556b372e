//! # cirrus-codec
//!
//! MQTT 3.1, 3.1.1 and 5.0 packets without I/O, so the codec can be tested,
//! fuzzed and benchmarked alone.
//!
//! ## Layout
//! - [`types`]: protocol levels, QoS, subscription options, reason codes.
//! - [`packet`]: one struct per control packet; strings are UTF-8-checked
//!   [`ByteString`]s and payloads [`Bytes`], slices of the frame read.
//! - [`properties`]: MQTT 5 properties, with the rule of which packet may
//!   carry which property.
//! - [`decode`]: fixed header first (an oversized frame is refused before it
//!   is buffered), then the body; byte-literal tests beside it.
//! - [`encode`]: lengths first, then one write; [`encode::encode_publish_parts`]
//!   writes a stored message with per-subscriber extras without cloning it.
//! - [`topic`]: topic name and filter rules, `$share/` parsing, matching.
//! - [`codec`]: a `tokio_util` codec for clients that want `Framed`.
//! - [`fuzzing`]: the bodies of the fuzz targets, also run by unit tests.

pub mod codec;
pub mod decode;
pub mod encode;
pub mod error;
pub mod fuzzing;
pub mod packet;
pub mod properties;
pub mod topic;
pub mod types;

pub use bytes::Bytes;
pub use bytestring::ByteString;
pub use codec::MqttCodec;
pub use decode::decode;
pub use encode::encode;
pub use error::{CodecError, DecodeError};
pub use packet::*;
pub use properties::Properties;
pub use types::{reason, Protocol, QoS, RetainHandling, SubscriptionOptions};
