//! The core's errors and the one mapping from them to status codes.
//!
//! [`ErrorCode`] carries gRPC's code numbers without depending on tonic, so that gRPC (as a
//! `tonic::Status`), QUIC (as a `Status` frame) and HTTP (as a status line) all map the same
//! error the same way.

use crate::store::StoreError;

use super::types::{Checksum, ConsumerIdError, Version, WorkerName};

/// gRPC status codes, by their wire numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ErrorCode {
    /// The request was malformed.
    InvalidArgument = 3,
    /// The thing asked for does not exist.
    NotFound = 5,
    /// It exists already, differently (a version re-published with other code).
    AlreadyExists = 6,
    /// The identity may not do this.
    PermissionDenied = 7,
    /// A limit was reached.
    ResourceExhausted = 8,
    /// A bug or corrupt state; details are logged, not shown.
    Internal = 13,
    /// Shutting down, or the store cannot be reached: try again, maybe elsewhere.
    Unavailable = 14,
    /// No valid client identity.
    Unauthenticated = 16,
}

impl ErrorCode {
    /// The gRPC code number.
    pub fn as_i32(self) -> i32 {
        self as i32
    }
}

/// Anything that maps to a status code and a message a client may see.
pub trait Coded: std::fmt::Display {
    /// The status code.
    fn code(&self) -> ErrorCode;

    /// The message for the client: the error's text, except for internal errors, whose
    /// details stay in the log.
    fn client_message(&self) -> String {
        match self.code() {
            ErrorCode::Internal => "internal error".to_owned(),
            _ => self.to_string(),
        }
    }
}

/// What a worker name must be, as refusals say it.
pub const WORKER_NAME_RULE: &str =
    "a worker name must match ^[a-z0-9][a-z0-9_-]{0,62}$ and be at most 63 characters";
/// What a version must be, as refusals say it.
pub const VERSION_RULE: &str =
    "a version must match ^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$ and be at most 64 characters";

/// A request field that does not pass validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    /// See [`WorkerName`].
    #[error("invalid worker name {0:?}: {WORKER_NAME_RULE}")]
    WorkerName(String),
    /// See [`Version`].
    #[error("invalid version {0:?}: {VERSION_RULE}")]
    Version(String),
    /// Not 64 hex digits.
    #[error("invalid checksum {0:?}: must be 64 hex digits (SHA-256)")]
    Checksum(String),
    /// An epoch that is not printable text.
    #[error("invalid epoch {0:?}")]
    Epoch(String),
    /// Anything else, described.
    #[error("{0}")]
    Other(String),
}

impl Coded for InvalidInput {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
}

impl Coded for ConsumerIdError {
    fn code(&self) -> ErrorCode {
        match self {
            ConsumerIdError::Invalid => ErrorCode::InvalidArgument,
            ConsumerIdError::NotYours { .. } => ErrorCode::PermissionDenied,
        }
    }
}

impl Coded for StoreError {
    fn code(&self) -> ErrorCode {
        match self {
            StoreError::Unavailable(_) | StoreError::HistoryLost(_) => ErrorCode::Unavailable,
            StoreError::Corrupt(_) | StoreError::Io(_) => ErrorCode::Internal,
        }
    }

    fn client_message(&self) -> String {
        match self {
            StoreError::Unavailable(_) | StoreError::HistoryLost(_) => {
                "store unavailable, try again".to_owned()
            }
            _ => "internal error".to_owned(),
        }
    }
}

/// Why a publish (put or delete) was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A malformed field.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The checksum the publisher gave does not match the code.
    #[error("checksum mismatch: given {given}, code has {actual}")]
    ChecksumMismatch {
        /// What the publisher said.
        given: Checksum,
        /// What the code hashes to.
        actual: Checksum,
    },
    /// The code is larger than the core accepts.
    #[error("worker code is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        /// Size of the code.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The version exists with other code; versions are immutable.
    #[error("version {version} of {worker} exists with another checksum ({existing})")]
    Conflict {
        /// The worker.
        worker: WorkerName,
        /// The version.
        version: Version,
        /// The checksum it was first published with.
        existing: Checksum,
    },
    /// Delete of a worker that has no live version.
    #[error("worker {0} does not exist")]
    NotFound(WorkerName),
    /// The store could not make the change durable.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The core is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

impl Coded for PublishError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) | Self::ChecksumMismatch { .. } => ErrorCode::InvalidArgument,
            Self::TooLarge { .. } => ErrorCode::ResourceExhausted,
            Self::Conflict { .. } => ErrorCode::AlreadyExists,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Store(e) => e.code(),
            Self::ShuttingDown => ErrorCode::Unavailable,
        }
    }

    fn client_message(&self) -> String {
        match self {
            Self::Store(e) => e.client_message(),
            _ => self.to_string(),
        }
    }
}

/// Why a subscription, fetch, listing, registration or ack was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A malformed field.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The `consumer_id` belongs to another identity.
    #[error(transparent)]
    ConsumerId(#[from] ConsumerIdError),
    /// The identity may not see this worker. Said the same way as [`Self::NotFound`] where
    /// the worker's existence must not leak.
    #[error("permission denied for worker {0}")]
    PermissionDenied(WorkerName),
    /// The identity's rights changed while it was subscribed: the subscription ends, and a new
    /// one is judged by the new rights.
    #[error("permission denied: access rights changed; subscribe again")]
    RightsChanged,
    /// No such worker or version.
    #[error("{0} not found")]
    NotFound(String),
    /// A limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The store could not answer.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The core is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

impl Coded for RequestError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::ConsumerId(e) => e.code(),
            Self::PermissionDenied(_) | Self::RightsChanged => ErrorCode::PermissionDenied,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
            Self::Store(e) => e.code(),
            Self::ShuttingDown => ErrorCode::Unavailable,
        }
    }

    fn client_message(&self) -> String {
        match self {
            Self::Store(e) => e.client_message(),
            _ => self.to_string(),
        }
    }
}
