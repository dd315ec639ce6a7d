//! One invalid field of a request: the unit in which every layer reports bad input.
use serde::Serialize;
use utoipa::ToSchema;

/// One invalid field of a request body.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct FieldError {
    /// JSON pointer-like path of the field, e.g. `credentials.client_id`.
    #[schema(example = "credentials.client_id")]
    pub field: String,
    #[schema(example = "must be a GUID")]
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}
