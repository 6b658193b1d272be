//! A request field that is malformed, as the domain's validators say it
//! (dispatch's selectors, quota pools' names): its own module, below the
//! rules that use it.

/// A request field that is malformed: INVALID_ARGUMENT, naming the field as
/// the request spells it (`selector.match_expressions[1].values`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {problem}")]
pub struct InvalidArgument {
    pub field: String,
    pub problem: String,
}

impl InvalidArgument {
    pub(crate) fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        InvalidArgument {
            field: field.into(),
            problem: problem.into(),
        }
    }
}
