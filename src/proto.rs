//! The generated protobuf and gRPC code, the descriptor set for reflection,
//! and the well-known types' conversions every side of the wire uses (the
//! services in `grpc`, the CLI, `views`).

use chrono::{DateTime, Datelike, Utc};
use prost_types::Timestamp;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("fleetcare.v1");
}

/// Every fleetcare proto, encoded, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fleetcare_descriptor.bin"));

/// `at` as a protobuf `Timestamp`.
pub fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// A protobuf `Timestamp` as a time; `None` unless its nanoseconds are in
/// range and its year is between 1 and 9999 (RFC 3339, and what every client
/// library can represent).
pub fn from_timestamp(ts: Timestamp) -> Option<DateTime<Utc>> {
    u32::try_from(ts.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
        .filter(|at| (1..=9999).contains(&at.year()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_out_of_range_ones_are_none() {
        let at = DateTime::parse_from_rfc3339("2026-04-01T10:00:00.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(from_timestamp(timestamp(at)), Some(at));
        for (seconds, nanos) in [
            (0, -1),
            (0, 1_000_000_000),
            (253_402_300_800, 0), // year 10000
            (i64::MAX, 0),
        ] {
            assert_eq!(from_timestamp(Timestamp { seconds, nanos }), None);
        }
    }
}
