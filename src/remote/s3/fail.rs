//! How an S3 request fails: each SDK error classified as final or worth a
//! retry, the store's retry loop, and secrets scrubbed from every message.

use super::*;

/// How one attempt ended, before the retry loop decides.
pub(super) enum Fail {
    /// A final answer (404, 412, 403, ...): retrying cannot change it.
    Fatal(StoreError),
    /// Connect error, timeout, 5xx, throttling: worth another attempt.
    Transient(String),
}

/// What a request addressed, to name the right "not found".
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    Object,
    Bucket,
}

impl S3Store {
    /// The store's own retry loop around one attempt `f`.
    pub(super) async fn retrying<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        mut f: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, Fail>>,
    {
        let mut r = Retrier::new(&self.opts.retry);
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Transient(detail)) => {
                    tracing::debug!(op, key, attempt = r.attempts() + 1, %detail, "transient S3 failure");
                    if !r.backoff().await {
                        return Err(self.unreachable(op, key, &r, detail));
                    }
                }
            }
        }
    }

    pub(super) fn unreachable(
        &self,
        op: &'static str,
        key: &str,
        r: &Retrier<'_>,
        detail: String,
    ) -> StoreError {
        StoreError::Unreachable {
            endpoint: self.endpoint.clone(),
            op,
            key: key.to_string(),
            attempts: r.attempts(),
            elapsed_ms: r.elapsed().as_millis() as u64,
            detail,
        }
    }

    /// Removes anything secret from text that came from the server or the SDK.
    pub(super) fn scrub(&self, mut s: String) -> String {
        for secret in &self.secrets {
            s = redact_token(&s, secret);
        }
        s
    }

    /// Sorts an SDK error into a final [`StoreError`] or a transient failure.
    pub(super) fn classify<E>(
        &self,
        op: &'static str,
        key: &str,
        target: Target,
        err: SdkError<E, HttpResponse>,
    ) -> Fail
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let other = |detail: String| {
            Fail::Fatal(StoreError::Other {
                op,
                key: key.to_string(),
                detail,
            })
        };
        let context = || self.scrub(error_chain(&err));
        let status = match &err {
            SdkError::ServiceError(ctx) => ctx.raw().status().as_u16(),
            SdkError::TimeoutError(_) => return Fail::Transient("timed out".into()),
            SdkError::ResponseError(_) => return Fail::Transient(context()),
            SdkError::DispatchFailure(d) if d.is_user() => return other(context()),
            SdkError::DispatchFailure(_) => return Fail::Transient(context()),
            _ => return other(context()),
        };
        let code = err.code().unwrap_or_default().to_string();
        let message = self.scrub(err.message().unwrap_or_default().to_string());
        let key = key.to_string();
        let fatal = Fail::Fatal;
        match (status, code.as_str()) {
            (_, "NoSuchBucket") => fatal(StoreError::NoSuchBucket {
                bucket: self.bucket.clone(),
            }),
            (304, _) => fatal(StoreError::NotModified { key }),
            (412, _) | (409, "ConditionalRequestConflict") => {
                fatal(StoreError::PreconditionFailed { key })
            }
            (404, _) if target == Target::Bucket => fatal(StoreError::NoSuchBucket {
                bucket: self.bucket.clone(),
            }),
            (404, _) => fatal(StoreError::NotFound { key }),
            (401 | 403, _)
            | (
                _,
                "AccessDenied"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "InvalidToken"
                | "ExpiredToken",
            ) => fatal(StoreError::AccessDenied {
                op,
                key,
                code: if code.is_empty() {
                    format!("HTTP {status}")
                } else {
                    code
                },
                message: if message.is_empty() {
                    "forbidden".into()
                } else {
                    message
                },
            }),
            (429 | 500..=599, _)
            | (_, "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable") => {
                Fail::Transient(
                    format!("HTTP {status} {code} {message}")
                        .trim_end()
                        .to_string(),
                )
            }
            _ => other(format!("HTTP {status} {code}: {message}")),
        }
    }
}

/// `error: cause: cause ...`, each message once. (The SDK's `DisplayErrorContext`
/// appends a Debug dump of the whole chain, too noisy for a one-line error.)
pub(super) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        let msg = e.to_string();
        if !msg.is_empty() && !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = e.source();
    }
    parts.join(": ")
}

/// Replace every occurrence of a real-sized secret; a short one (say `a`) only
/// where it stands as a whole word, since inside a longer word it reveals nothing
/// and blanking it there would garble the message ("disp<redacted>tch failure").
pub(super) fn redact_token(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        return text.to_string();
    }
    if secret.len() >= 8 {
        return text.replace(secret, "<redacted>");
    }
    let in_token = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(secret) {
        let before = rest[..i].chars().next_back().or(out.chars().next_back());
        let after = rest[i + secret.len()..].chars().next();
        out.push_str(&rest[..i]);
        if before.is_some_and(in_token) || after.is_some_and(in_token) {
            out.push_str(secret);
        } else {
            out.push_str("<redacted>");
        }
        rest = &rest[i + secret.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod redact_tests {
    use super::redact_token;

    #[test]
    pub(super) fn whole_tokens_only() {
        assert_eq!(redact_token("dispatch failure", "a"), "dispatch failure");
        assert_eq!(
            redact_token("key a rejected", "a"),
            "key <redacted> rejected"
        );
        assert_eq!(
            redact_token("Credential=AKIA1234567/2026", "AKIA1234567"),
            "Credential=<redacted>/2026"
        );
        assert_eq!(
            redact_token("Credential=ak/2026", "ak"),
            "Credential=<redacted>/2026"
        );
        assert_eq!(
            redact_token("secret: s3cr3t.", "s3cr3t"),
            "secret: <redacted>."
        );
    }
}
