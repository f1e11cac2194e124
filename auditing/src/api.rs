//! The batch status HTTP API, answered from the auditing stage's [`BatchIndex`] in memory
//! (no store read per request). The stage serves it beside /metrics on its telemetry
//! address. Read-only, JSON, and nothing sealed: reasons stay in the trail.
//!
//! - `GET /batches/{id}`: 200 and the batch, 404 for an id the trail does not hold, 400
//!   for one that is not a hyphenated UUID (what ingestion's batch ids are).
//! - `GET /batches?state=held&limit=100`: 200 and the batches newest first, at most
//!   `limit` (default 1000, at most 10,000); `X-Total-Count` says how many match. An
//!   unknown state, a bad limit or an unknown parameter is a 400.
//!
//! Errors are `{"error": "..."}` and never echo what the client sent.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use uuid::Uuid;

use crate::batches::{BatchIndex, BatchView, SharedIndex};

/// Batches a list returns when the request gives no `limit`.
pub const DEFAULT_LIMIT: usize = 1000;
/// The largest `limit` a list accepts, which bounds the work and the body of one request.
pub const MAX_LIMIT: usize = 10_000;

const TOTAL_COUNT: HeaderName = HeaderName::from_static("x-total-count");

/// The API's routes over a shared index, ready to merge into another router.
pub fn router(index: SharedIndex) -> Router {
    Router::new()
        .route("/batches", get(list))
        .route("/batches/{id}", get(one))
        .with_state(index)
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The response could not be serialised.",
        ),
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::to_vec(&ErrorBody { error: message }).unwrap_or_default();
    (status, [(CONTENT_TYPE, "application/json")], body).into_response()
}

fn loading() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "The audit store is still being replayed into the batch index; try again shortly.",
    )
}

/// Reads the index. A writer that panicked left it as it was between two entries, which
/// is still a consistent index, so a poisoned lock is read anyway.
fn read<T>(index: &SharedIndex, f: impl FnOnce(&BatchIndex) -> T) -> T {
    let guard = index
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(&guard)
}

/// A batch id exactly as ingestion writes them: a hyphenated UUID (either case).
pub fn parse_batch_id(raw: &str) -> Option<Uuid> {
    if raw.len() != 36 {
        return None;
    }
    Uuid::try_parse(raw).ok()
}

async fn one(
    State(index): State<SharedIndex>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let Ok(Path(raw)) = id else {
        return error(StatusCode::BAD_REQUEST, "The batch id is not valid UTF-8.");
    };
    let Some(id) = parse_batch_id(&raw) else {
        return error(
            StatusCode::BAD_REQUEST,
            "A batch id is a hyphenated UUID (8-4-4-4-12 hex digits).",
        );
    };
    // Ids are stored as written, which is lowercase for every id medpipe makes.
    let found = read(&index, |ix| {
        if ix.is_loading() {
            return Err(());
        }
        Ok(ix
            .get(&raw)
            .or_else(|| ix.get(&id.hyphenated().to_string())))
    });
    match found {
        Err(()) => loading(),
        Ok(Some(b)) => json(StatusCode::OK, &b),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "The audit trail holds no batch with this id.",
        ),
    }
}

/// What a list asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListQuery {
    pub state: Option<crate::batches::State>,
    pub limit: usize,
}

/// Parses `state=...&limit=...`. Values are compared as sent (no state name or number
/// needs percent-encoding), so an encoded one is simply not recognised.
pub fn parse_list_query(query: Option<&str>) -> Result<ListQuery, String> {
    let mut q = ListQuery {
        state: None,
        limit: DEFAULT_LIMIT,
    };
    let (mut seen_state, mut seen_limit) = (false, false);
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "state" if !seen_state => {
                seen_state = true;
                if !value.is_empty() {
                    q.state = Some(crate::batches::State::parse(value).ok_or_else(unknown_state)?);
                }
            }
            "limit" if !seen_limit => {
                seen_limit = true;
                q.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| format!("The limit is a whole number from 1 to {MAX_LIMIT}."))?;
            }
            "state" | "limit" => return Err("A parameter is given twice.".into()),
            _ => return Err("Unknown parameter: a list takes only state and limit.".into()),
        }
    }
    Ok(q)
}

fn unknown_state() -> String {
    let names: Vec<&str> = crate::batches::State::all()
        .iter()
        .map(|s| s.as_str())
        .collect();
    format!("Unknown state: expected one of {}.", names.join(", "))
}

async fn list(State(index): State<SharedIndex>, RawQuery(query): RawQuery) -> Response {
    let q = match parse_list_query(query.as_deref()) {
        Ok(q) => q,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    // Copied out under the lock and serialised after it, so the stage's writes wait for
    // the copy only.
    let found = read(&index, |ix| {
        if ix.is_loading() {
            return None;
        }
        let page: Vec<BatchView> = ix.newest(q.state).take(q.limit).cloned().collect();
        Some((ix.count(q.state), page))
    });
    let Some((total, page)) = found else {
        return loading();
    };
    let mut response = json(StatusCode::OK, &page);
    response.headers_mut().insert(TOTAL_COUNT, total.into());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batches::State;

    #[test]
    fn batch_ids_are_hyphenated_uuids_only() {
        let id = "6f1c2c1e-2b7a-5d3e-9c41-0a6c1d2e3f40";
        assert!(parse_batch_id(id).is_some());
        assert!(parse_batch_id(&id.to_uppercase()).is_some());
        for bad in [
            "",
            "held",
            "6f1c2c1e2b7a5d3e9c410a6c1d2e3f40",
            "{6f1c2c1e-2b7a-5d3e-9c41-0a6c1d2e3f40}",
            "urn:uuid:6f1c2c1e-2b7a-5d3e-9c41-0a6c1d2e3f40",
            "6f1c2c1e-2b7a-5d3e-9c41-0a6c1d2e3f4g",
            "6f1c2c1e-2b7a-5d3e-9c41-0a6c1d2e3f4",
            "6f1c2c1e+2b7a-5d3e-9c41-0a6c1d2e3f40",
        ] {
            assert!(parse_batch_id(bad).is_none(), "{bad} was accepted");
        }
    }

    #[test]
    fn list_queries_take_a_known_state_and_a_bounded_limit() {
        let ok = |q: &str| parse_list_query(Some(q));
        let all = ListQuery {
            state: None,
            limit: DEFAULT_LIMIT,
        };
        assert_eq!(parse_list_query(None), Ok(all));
        assert_eq!(ok(""), Ok(all));
        assert_eq!(ok("state="), Ok(all));
        assert_eq!(
            ok("state=held"),
            Ok(ListQuery {
                state: Some(State::Held),
                limit: DEFAULT_LIMIT
            })
        );
        assert_eq!(
            ok("limit=10000&state=in_progress"),
            Ok(ListQuery {
                state: Some(State::InProgress),
                limit: MAX_LIMIT
            })
        );
        for bad in [
            "state=stuck",
            "state=Held",
            "state=in-progress",
            "limit=0",
            "limit=10001",
            "limit=-1",
            "limit=ten",
            "limit=",
            "status=held",
            "state=held&state=published",
        ] {
            assert!(ok(bad).is_err(), "{bad} was accepted");
        }
    }
}
