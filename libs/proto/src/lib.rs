//! The gRPC API (`hodei.v1`), generated from `proto/` at build time, and the conversions
//! between the wire types and the domain. Conversions live here, beside the generated code,
//! so services never build wire messages by hand.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("hodei.v1");
}

pub mod bearer;
mod convert;
mod pipelines;
mod schedules;

pub use bearer::{AuthChannel, Bearer};
pub use convert::{job_event_to_wire, state_from_wire, status_from_wire, timestamp};
pub use pipelines::{
    pipeline_event_to_wire, pipeline_run_to_wire, pipeline_spec_from_wire, pipeline_spec_to_wire,
    pipeline_state_from_wire,
};
pub use schedules::{DEFAULT_CATCH_UP_WINDOW_MS, DEFAULT_HISTORY_LIMIT, schedule_spec_from_wire};

/// The encoded descriptor set of every `hodei.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hodei_descriptor.bin"));
