//! One error type for every data source, so the trainer can print a single line that says what went
//! wrong and with which file.
use std::path::PathBuf;

/// Everything that can go wrong while finding, decoding or augmenting training data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: not found ({what})")]
    NotFound { path: PathBuf, what: String },

    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: corrupt or unreadable image: {message}")]
    CorruptImage { path: PathBuf, message: String },

    #[error("{path}: no images found (expected <root>/<class>/<name>.png|jpg|jpeg)")]
    EmptyFolder { path: PathBuf },

    #[error(
        "{path}: CIFAR file of {size} bytes is not a positive multiple of the {record}-byte record (truncated or not CIFAR-{variant})"
    )]
    CifarSize {
        path: PathBuf,
        size: u64,
        record: usize,
        variant: usize,
    },

    #[error(
        "{path}: record {record} has label {label}, but CIFAR-{variant} has {classes} classes"
    )]
    CifarLabel {
        path: PathBuf,
        record: usize,
        label: usize,
        variant: usize,
        classes: usize,
    },

    #[error(
        "{path}: class '{class}' of the held-out folder is not a class of the training folder \
         (training classes: {known})"
    )]
    UnknownClass {
        path: PathBuf,
        class: String,
        known: String,
    },

    #[error("sample index {index} is out of range for a dataset of {len} samples")]
    OutOfRange { index: usize, len: usize },

    #[error("invalid data configuration: {0}")]
    Config(String),

    #[error("{path}: cannot write image: {message}")]
    Write { path: PathBuf, message: String },

    #[error("data loading was cancelled")]
    Cancelled,

    #[error("data worker failed: {0}")]
    Worker(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::NotFound {
                path,
                what: source.to_string(),
            }
        } else {
            DataError::Io { path, source }
        }
    }
}
