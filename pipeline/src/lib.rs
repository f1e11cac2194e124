//! Shared plumbing for every medpipe stage: the event envelope, the Avro and
//! Schema Registry codec, topics, the transactional Kafka runner, config,
//! telemetry, shutdown and crypto helpers.

pub mod access;
pub mod archive;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod error;
pub mod events;
pub mod formats;
pub mod hl7;
pub mod kafka;
pub mod readback;
pub mod resources;
pub mod runner;
pub mod schemas;
pub mod shutdown;
pub mod stage;
pub mod state;
pub mod telemetry;
pub mod topics;
pub mod txn;

pub use codec::Codec;
pub use error::{ErrorClass, PipelineError};
pub use events::{Event, Header, Payload};
pub use formats::SourceFormat;
pub use resources::ResourceType;
pub use runner::{Input, Outcome, Output, Stage};
pub use topics::Topics;
