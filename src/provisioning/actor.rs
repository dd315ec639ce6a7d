//! Who asked for a change: an API caller or a queue job. The audit trail records it.
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A caller of the HTTP API: its token's subject and app, and the request id.
    Caller {
        subject: Option<String>,
        app: Option<String>,
        request_id: String,
    },
    /// A job of mailscope's own queue acting on a caller's earlier request.
    Job { kind: &'static str, id: Uuid },
}

impl Actor {
    /// The `actor_sub` of the audit event.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Actor::Caller { subject, .. } => subject.as_deref(),
            Actor::Job { .. } => None,
        }
    }

    /// The `actor_app` of the audit event: the caller's app, or `mailscope:job/{kind}`.
    pub fn app(&self) -> Option<String> {
        match self {
            Actor::Caller { app, .. } => app.clone(),
            Actor::Job { kind, .. } => Some(format!("mailscope:job/{kind}")),
        }
    }

    /// The `request_id` of the audit event: the HTTP request id, or `job/{id}`.
    pub fn request_id(&self) -> String {
        match self {
            Actor::Caller { request_id, .. } => request_id.clone(),
            Actor::Job { id, .. } => format!("job/{id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_named_in_the_audit_fields() {
        let id = Uuid::nil();
        let a = Actor::Job {
            kind: "propagation_check",
            id,
        };
        assert_eq!(a.subject(), None);
        assert_eq!(a.app().as_deref(), Some("mailscope:job/propagation_check"));
        assert_eq!(a.request_id(), format!("job/{id}"));
    }
}
