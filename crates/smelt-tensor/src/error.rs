/// One error type for every layer: each variant is a kind of failure the user can act on, and
/// the message names the model element (node, tensor, file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file or graph is malformed (bad protobuf, dangling edge, cycle, ...).
    #[error("invalid model: {0}")]
    Invalid(String),
    /// Valid, but uses something smelt does not implement (an op, a dtype, an attribute value).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Shapes or dtypes do not fit together.
    #[error("shape error: {0}")]
    Shape(String),
    /// A size read from a file or requested by the graph exceeds a configured limit.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// Bad input data or options from the user.
    #[error("{0}")]
    Input(String),
    /// A stop was requested (Ctrl-C); see [`crate::interrupt`].
    #[error("interrupted")]
    Interrupted,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Prefixes the message with where it happened (e.g. a node name), keeping the kind.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        let what = what.to_string();
        // Layers that each name the node or file would otherwise repeat it.
        let add = |m: String| {
            if m.starts_with(&format!("{what}: ")) {
                m
            } else {
                format!("{what}: {m}")
            }
        };
        match self {
            Error::Invalid(m) => Error::Invalid(add(m)),
            Error::Unsupported(m) => Error::Unsupported(add(m)),
            Error::Shape(m) => Error::Shape(add(m)),
            Error::Limit(m) => Error::Limit(add(m)),
            Error::Input(m) => Error::Input(add(m)),
            Error::Interrupted => Error::Interrupted,
            Error::Io { context, source } => Error::Io {
                context: format!("{what}: {context}"),
                source,
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `bail!(Kind, "fmt", args)` returns early with `Error::Kind(format!(...))`.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::Error::$kind(format!($($arg)*)))
    };
}
