//! Engine errors as API errors, with the statuses vLLM gives them (a dead engine is a 500 with
//! vLLM's `EngineDeadError` text, an overloaded one a 503).

use protocol::ApiError;

use crate::engine::EngineError;

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Dead | EngineError::Start(_) => ApiError::engine_dead(),
            EngineError::Overloaded => ApiError::service_unavailable(e.to_string()),
            EngineError::DuplicateRequestId(_) => ApiError::bad_request(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn engine_errors_map_to_statuses() {
        assert_eq!(
            ApiError::from(EngineError::Dead).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            ApiError::from(EngineError::Overloaded).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
