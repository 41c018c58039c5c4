//! Every answer the request path gives: one enum of outcomes, one function that builds the
//! HTTP response for each, so that status, error code, metric label and body never disagree.

use bytes::Bytes;
use pingora_http::ResponseHeader;

/// How a request to an action path ended. The label is the `outcome` of
/// `actiongate_requests_total` and, for errors, the `error` code of the JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Accepted,
    Duplicate,
    ForbiddenSource,
    Unauthorized,
    InvalidJson,
    InvalidPayload,
    PayloadTooLarge,
    UnsupportedMediaType,
    MethodNotAllowed,
    RequestTimeout,
    Unavailable,
    UnknownAction,
    /// One of the action's guards refused the push (`guard:`).
    Guarded,
    /// An event type the action does not take (`events:`): a 200, so that Flashduty sees no
    /// failure, but not stored.
    Ignored,
}

impl Outcome {
    pub const ALL: [Outcome; 14] = [
        Outcome::Accepted,
        Outcome::Duplicate,
        Outcome::ForbiddenSource,
        Outcome::Unauthorized,
        Outcome::InvalidJson,
        Outcome::InvalidPayload,
        Outcome::PayloadTooLarge,
        Outcome::UnsupportedMediaType,
        Outcome::MethodNotAllowed,
        Outcome::RequestTimeout,
        Outcome::Unavailable,
        Outcome::UnknownAction,
        Outcome::Guarded,
        Outcome::Ignored,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::ForbiddenSource => "forbidden_source",
            Outcome::Unauthorized => "unauthorized",
            Outcome::InvalidJson => "invalid_json",
            Outcome::InvalidPayload => "invalid_payload",
            Outcome::PayloadTooLarge => "payload_too_large",
            Outcome::UnsupportedMediaType => "unsupported_media_type",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::RequestTimeout => "request_timeout",
            Outcome::Unavailable => "unavailable",
            Outcome::UnknownAction => "unknown_action",
            Outcome::Guarded => "guarded",
            Outcome::Ignored => "ignored",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Outcome::Accepted | Outcome::Duplicate | Outcome::Ignored => 200,
            Outcome::InvalidJson | Outcome::InvalidPayload => 400,
            Outcome::Unauthorized => 401,
            Outcome::ForbiddenSource => 403,
            Outcome::UnknownAction => 404,
            Outcome::MethodNotAllowed => 405,
            Outcome::Guarded => 409,
            Outcome::RequestTimeout => 408,
            Outcome::PayloadTooLarge => 413,
            Outcome::UnsupportedMediaType => 415,
            Outcome::Unavailable => 503,
        }
    }
}

/// An answer ready to be written: the outcome and the text that goes with it (the event_id
/// for a 200, the human message for an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub outcome: Outcome,
    pub detail: String,
}

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECONDS: &str = "1";

impl Answer {
    pub fn success(outcome: Outcome, event_id: &str) -> Answer {
        Answer {
            outcome,
            detail: event_id.to_string(),
        }
    }

    pub fn error(outcome: Outcome, message: impl Into<String>) -> Answer {
        Answer {
            outcome,
            detail: message.into(),
        }
    }

    /// The JSON body of this answer.
    pub fn body(&self) -> Bytes {
        // Written straight from borrowed fields: a `json!` tree cost two maps and a copy of the
        // detail on every ack (#16).
        #[derive(serde::Serialize)]
        struct Taken<'a> {
            status: &'a str,
            event_id: &'a str,
        }
        #[derive(serde::Serialize)]
        struct Refused<'a> {
            error: &'a str,
            message: &'a str,
        }
        let (label, detail) = (self.outcome.label(), self.detail.as_str());
        let body = match self.outcome {
            Outcome::Accepted | Outcome::Duplicate | Outcome::Ignored => {
                serde_json::to_vec(&Taken {
                    status: label,
                    event_id: detail,
                })
            }
            _ => serde_json::to_vec(&Refused {
                error: label,
                message: detail,
            }),
        };
        // Two strings always serialize; an empty body would still say its length.
        Bytes::from(body.unwrap_or_default())
    }

    /// The response header and body. Every response carries `Content-Length`: without it an
    /// HTTP/1.1 body would be close-delimited while keep-alive stays on, and clients hang.
    pub fn to_response(&self) -> pingora_core::Result<(ResponseHeader, Bytes)> {
        let body = self.body();
        let mut header = ResponseHeader::build(self.outcome.status(), Some(4))?;
        header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        match self.outcome {
            Outcome::MethodNotAllowed => header.insert_header(http::header::ALLOW, "POST")?,
            Outcome::Unavailable => {
                header.insert_header(http::header::RETRY_AFTER, RETRY_AFTER_SECONDS)?
            }
            _ => {}
        }
        Ok((header, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_and_statuses_match_the_contract() {
        let labels: std::collections::HashSet<_> = Outcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(labels.len(), Outcome::ALL.len());
        assert_eq!(Outcome::InvalidJson.status(), 400);
        assert_eq!(Outcome::RequestTimeout.status(), 408);
        assert_eq!(Outcome::UnsupportedMediaType.status(), 415);
        assert_eq!(Outcome::Guarded.status(), 409);
        assert_eq!(Outcome::Ignored.status(), 200);
    }

    #[test]
    fn bodies_are_json_with_the_right_shape() {
        let ok = Answer::success(Outcome::Duplicate, "abc");
        assert_eq!(
            &ok.body()[..],
            br#"{"status":"duplicate","event_id":"abc"}"#
        );
        let ignored = Answer::success(Outcome::Ignored, "abc");
        assert_eq!(
            &ignored.body()[..],
            br#"{"status":"ignored","event_id":"abc"}"#
        );
        let err = Answer::error(Outcome::InvalidPayload, "incident.title: expected a string");
        assert_eq!(
            &err.body()[..],
            br#"{"error":"invalid_payload","message":"incident.title: expected a string"}"#
        );
        let quoted = Answer::error(Outcome::InvalidJson, "a \"quote\" and a \\ and \u{1}");
        let v: serde_json::Value = serde_json::from_slice(&quoted.body()).unwrap();
        assert_eq!(v["message"], "a \"quote\" and a \\ and \u{1}");
    }

    #[test]
    fn method_not_allowed_says_allow_post_and_unavailable_says_retry_after() {
        let (h, _) = Answer::error(Outcome::MethodNotAllowed, "x")
            .to_response()
            .unwrap();
        assert_eq!(h.headers.get("allow").unwrap(), "POST");
        let (h, body) = Answer::error(Outcome::Unavailable, "x")
            .to_response()
            .unwrap();
        assert_eq!(h.headers.get("retry-after").unwrap(), "1");
        assert_eq!(
            h.headers.get("content-length").unwrap().to_str().unwrap(),
            body.len().to_string()
        );
    }
}
