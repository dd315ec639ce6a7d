//! The `Caller` extractor: verifies the request's bearer token with the shared `auth::Verifier`.
//! Here rather than in `auth` so that `auth` does not depend on the API's error type.
use std::future::Future;
use std::pin::Pin;

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};

use super::problem::ApiError;
use crate::auth::{AuthError, Caller, Denied, Verifier, bearer_token};

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Caller, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let verifier = req.app_data::<web::Data<Verifier>>().cloned();
        let token = bearer_token(req);
        Box::pin(async move {
            let verifier = verifier
                .ok_or_else(|| ApiError::internal(anyhow::anyhow!("verifier not configured")))?;
            let token = token.ok_or(Denied::Unauthenticated(AuthError::Missing))?;
            Ok(verifier.verify(&token).await.map_err(Denied::from)?)
        })
    }
}
