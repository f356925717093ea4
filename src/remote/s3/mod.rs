//! [`ObjectStore`] on aws-sdk-s3, for MinIO (production), SeaweedFS (tests) and AWS.
//!
//! The client is built by hand rather than through `aws-config`'s loaders, so
//! that nothing is read from `~/.aws` or the `AWS_*` environment and no instance
//! metadata endpoint is ever contacted: the endpoint, region and static keys come
//! from membridge's own configuration only. Buckets are addressed path-style
//! (`http://host:port/bucket/key`), which every S3-compatible server accepts.
//!
//! Server differences handled here (each works for MinIO, SeaweedFS and AWS):
//! - A conditional put that loses a race may come back as 412 PreconditionFailed
//!   or as 409 ConditionalRequestConflict (AWS, MinIO); both are
//!   [`StoreError::PreconditionFailed`].
//! - `If-Match` on a missing key is 412 on SeaweedFS and MinIO but 404 NoSuchKey
//!   on AWS; both are [`StoreError::PreconditionFailed`].
//! - HEAD responses carry no error body, so a 404 from HEAD cannot tell a missing
//!   key from a missing bucket; it is reported as [`StoreError::NotFound`].
//!
//! Every object is written with one PutObject (up to 5 GiB), never multipart:
//! a conditional multipart completion is not atomic on every S3-compatible server.
//! SeaweedFS serialises conditional writes to one key behind a lock that waiters
//! poll about once a second, so there a contended CAS costs the losers up to a
//! second each; uncontended writes are not delayed.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::mem::local_io;
use super::retry::{Retrier, RetryPolicy};
use super::{BoxFuture, GetResult, ObjectMeta, ObjectStore, PutMode, Result, StoreError};

/// A value that must never be printed (access and secret keys).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Connection settings for the bucket.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: Secret,
    pub secret_key: Secret,
}

/// Timeouts, retries and paging of an [`S3Store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    pub retry: RetryPolicy,
    /// TCP (and TLS) connection set-up.
    pub connect_timeout: Duration,
    /// One attempt, from sending the request (body included) to the response
    /// headers. Callers with a tighter deadline (lease renewal) wrap the call in
    /// their own timeout.
    pub request_timeout: Duration,
    /// Keys per ListObjectsV2 page; S3 caps it at 1000. Smaller values only serve
    /// to exercise pagination in tests.
    pub list_page_size: i32,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(60),
            list_page_size: 1000,
        }
    }
}

impl S3Options {
    /// For commands a person waits on: a dead endpoint is reported within seconds.
    pub fn interactive() -> Self {
        S3Options {
            retry: RetryPolicy::interactive(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(8),
            ..S3Options::default()
        }
    }
}

/// One bucket on an S3-compatible server.
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    endpoint: String,
    region: String,
    opts: S3Options,
    /// Credential strings scrubbed from every error detail, in case a server or a
    /// library ever echoes one back.
    secrets: Vec<String>,
}

impl fmt::Debug for S3Store {
    /// Hand-written: the SDK client's own Debug prints the access key id.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// What a put sends: bytes held in memory, or a file read as it is sent (one
/// PUT takes up to 5 GB, so a snapshot needs no multipart upload).
enum Body<'a> {
    Bytes(Bytes),
    File(&'a Path),
}

/// The slowest upload rate (bytes/s) a streamed put is given time for.
const SLOWEST_UPLOAD: u64 = 1 << 20;

/// Read size of a file body: large enough for few system calls, small
/// enough that memory does not depend on the file.
const FILE_CHUNK: usize = 256 << 10;

type HttpResponse = aws_smithy_runtime_api::client::orchestrator::HttpResponse;

impl S3Store {
    pub fn new(settings: &S3Settings, opts: S3Options) -> S3Store {
        let creds = Credentials::new(
            settings.access_key.expose(),
            settings.secret_key.expose(),
            None,
            None,
            "membridge-config",
        );
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.request_timeout)
            .operation_attempt_timeout(opts.request_timeout)
            .build();
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .endpoint_url(settings.endpoint.clone())
            .force_path_style(true)
            .credentials_provider(creds)
            // Our Retrier is the only retry loop; see retry.rs.
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            // Recent SDKs add CRC trailers (aws-chunked uploads) by default, which
            // older MinIO releases and other S3-compatible servers reject. Segments
            // and snapshots carry their own checksums, and SigV4 already signs the
            // payload hash.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        let secrets = [settings.access_key.expose(), settings.secret_key.expose()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        S3Store {
            client: aws_sdk_s3::Client::from_conf(conf),
            bucket: settings.bucket.clone(),
            endpoint: settings.endpoint.clone(),
            region: settings.region.clone(),
            opts,
            secrets,
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Creates the bucket (success if it already exists and is ours). The daemon
    /// never calls this: a missing bucket is a configuration error. It serves the
    /// test harness and setup tooling.
    pub async fn create_bucket(&self) -> Result<()> {
        let region = self.region.clone();
        self.retrying("create bucket", "", || async {
            let mut req = self.client.create_bucket().bucket(&self.bucket);
            if region != "us-east-1" {
                let constraint = BucketLocationConstraint::from(region.as_str());
                req = req.create_bucket_configuration(
                    CreateBucketConfiguration::builder()
                        .location_constraint(constraint)
                        .build(),
                );
            }
            match req.send().await {
                Ok(_) => Ok(()),
                Err(e) if matches!(e.code(), Some("BucketAlreadyOwnedByYou")) => Ok(()),
                Err(e) => Err(self.classify("create bucket", "", Target::Bucket, e)),
            }
        })
        .await
    }

    async fn collect(&self, body: ByteStream) -> std::result::Result<Bytes, Fail> {
        body.collect()
            .await
            .map(|b| b.into_bytes())
            .map_err(|e| Fail::Transient(self.scrub(format!("reading the response body: {e}"))))
    }

    async fn get_impl(&self, key: &str, if_none_match: Option<&str>) -> Result<Option<GetResult>> {
        let got = self
            .retrying("get", key, || async {
                let req = self.client.get_object().bucket(&self.bucket).key(key);
                let req = match if_none_match {
                    Some(etag) => req.if_none_match(etag),
                    None => req,
                };
                let out = req
                    .send()
                    .await
                    .map_err(|e| self.classify("get", key, Target::Object, e))?;
                let etag = out.e_tag.unwrap_or_default();
                let body = self.collect(out.body).await?;
                Ok(GetResult { body, etag })
            })
            .await;
        match got {
            Ok(r) => Ok(Some(r)),
            Err(StoreError::NotModified { .. }) if if_none_match.is_some() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn get_range_impl(&self, key: &str, start: u64, len: u64) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let last = start.saturating_add(len - 1);
        let invalid = || StoreError::InvalidRange {
            key: key.to_string(),
            start,
            len,
        };
        self.retrying("get range", key, || async {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .range(format!("bytes={start}-{last}"))
                .send()
                .await
                .map_err(|e| match e.raw_response().map(|r| r.status().as_u16()) {
                    Some(416) => Fail::Fatal(invalid()),
                    _ => self.classify("get range", key, Target::Object, e),
                })?;
            let ranged = out.content_range.is_some();
            let body = self.collect(out.body).await?;
            if ranged {
                return Ok(body);
            }
            // A server that ignores Range answers 200 with the whole object.
            let size = body.len() as u64;
            if start >= size {
                return Err(Fail::Fatal(invalid()));
            }
            Ok(body.slice(start as usize..(last.saturating_add(1)).min(size) as usize))
        })
        .await
    }

    async fn head_impl(&self, key: &str) -> Result<ObjectMeta> {
        self.retrying("head", key, || async {
            let out = self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| self.classify("head", key, Target::Object, e))?;
            Ok(ObjectMeta {
                key: key.to_string(),
                size: out.content_length.unwrap_or(0).max(0) as u64,
                etag: out.e_tag.unwrap_or_default(),
                last_modified: out.last_modified.as_ref().and_then(to_chrono),
            })
        })
        .await
    }

    async fn put_once(
        &self,
        key: &str,
        body: &Body<'_>,
        mode: &PutMode,
    ) -> std::result::Result<String, Fail> {
        let (stream, attempt_timeout) = match body {
            Body::Bytes(b) => (ByteStream::from(b.clone()), None),
            // Re-opened for every attempt: a retry sends the file from its start.
            Body::File(path) => {
                let stream = ByteStream::read_from()
                    .path(path)
                    .buffer_size(FILE_CHUNK)
                    .build()
                    .await
                    .map_err(|e| {
                        Fail::Fatal(local_io("put", key, path, std::io::Error::other(e)))
                    })?;
                let len = stream.size_hint().1.unwrap_or(0);
                (stream, Some(self.upload_timeout(len)))
            }
        };
        let req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/octet-stream")
            .body(stream);
        let req = match mode {
            PutMode::Overwrite => req,
            PutMode::CreateOnly => req.if_none_match("*"),
            PutMode::IfMatch(etag) => req.if_match(etag),
        };
        let sent = match attempt_timeout {
            Some(t) => {
                let timeouts = TimeoutConfig::builder()
                    .connect_timeout(self.opts.connect_timeout)
                    .read_timeout(self.opts.request_timeout)
                    .operation_attempt_timeout(t)
                    .build();
                req.customize()
                    .config_override(
                        aws_sdk_s3::config::Builder::default().timeout_config(timeouts),
                    )
                    .send()
                    .await
            }
            None => req.send().await,
        };
        let out = sent.map_err(|e| {
            let conditional = mode.is_conditional();
            let status = e.raw_response().map(|r| r.status().as_u16());
            match self.classify("put", key, Target::Object, e) {
                // AWS answers If-Match on a missing key with 404 NoSuchKey.
                Fail::Fatal(StoreError::NotFound { key })
                    if matches!(mode, PutMode::IfMatch(_)) =>
                {
                    Fail::Fatal(StoreError::PreconditionFailed { key })
                }
                // Any other 409 on a conditional put is also a lost race.
                Fail::Fatal(StoreError::Other { .. }) if conditional && status == Some(409) => {
                    Fail::Fatal(StoreError::PreconditionFailed {
                        key: key.to_string(),
                    })
                }
                f => f,
            }
        })?;
        out.e_tag.ok_or_else(|| {
            Fail::Fatal(StoreError::Other {
                op: "put",
                key: key.to_string(),
                detail: "the server stored the object but returned no ETag".into(),
            })
        })
    }

    async fn put_impl(&self, key: &str, body: Body<'_>, mode: PutMode) -> Result<String> {
        let mut r = Retrier::new(&self.opts.retry);
        // Set once an attempt failed in a way that may have reached the server
        // (timeout, lost response, 5xx): that attempt may have stored the object.
        let mut maybe_applied = false;
        loop {
            match self.put_once(key, &body, &mode).await {
                Ok(etag) => return Ok(etag),
                // A conditional retry that fails its precondition may have been
                // beaten by our own earlier attempt; don't report that as a lost race
                // (it would make a primary believe it was deposed).
                Err(Fail::Fatal(StoreError::PreconditionFailed { .. })) if maybe_applied => {
                    return self.confirm_own_write(key, &body).await;
                }
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Transient(detail)) => {
                    maybe_applied = true;
                    tracing::debug!(op = "put", key, attempt = r.attempts() + 1, %detail, "transient S3 failure");
                    if !r.backoff().await {
                        return Err(self.unreachable("put", key, &r, detail));
                    }
                }
            }
        }
    }

    /// One attempt's limit for a body of `len` bytes: the request timeout,
    /// plus the time to send it at [`SLOWEST_UPLOAD`] bytes/s, so a large
    /// snapshot on a slow link is not cut off and retried forever.
    fn upload_timeout(&self, len: u64) -> Duration {
        self.opts.request_timeout + Duration::from_secs(len / SLOWEST_UPLOAD)
    }

    /// After an ambiguous conditional put: the write is ours if the object now
    /// holds exactly our bytes.
    async fn confirm_own_write(&self, key: &str, body: &Body<'_>) -> Result<String> {
        let same = match body {
            Body::Bytes(body) => match self.get_impl(key, None).await {
                Ok(Some(cur)) if cur.body == *body => Ok(Some(cur.etag)),
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            },
            Body::File(path) => self.holds_file(key, path).await,
        };
        match same {
            Ok(Some(etag)) => Ok(etag),
            Ok(None) | Err(StoreError::NotFound { .. }) => Err(StoreError::PreconditionFailed {
                key: key.to_string(),
            }),
            Err(e) => Err(e),
        }
    }

    /// The object's ETag if it holds exactly the bytes of the file at `path`,
    /// compared chunk by chunk as the body arrives.
    async fn holds_file(&self, key: &str, path: &Path) -> Result<Option<String>> {
        use tokio::io::AsyncReadExt;
        self.retrying("get", key, || async {
            let out = self.get_whole(key).await?;
            let local = |e| Fail::Fatal(local_io("get", key, path, e));
            let mut f = tokio::fs::File::open(path).await.map_err(local)?;
            let mut body = out.body;
            let mut mine = Vec::new();
            while let Some(chunk) = body.try_next().await.map_err(|e| self.body_error(e))? {
                mine.resize(chunk.len(), 0);
                match f.read_exact(&mut mine).await {
                    Ok(_) if mine[..] == chunk[..] => {}
                    Ok(_) => return Ok(None),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                    Err(e) => return Err(local(e)),
                }
            }
            let at_end = f.read(&mut [0u8; 1]).await.map_err(local)? == 0;
            Ok(at_end.then(|| out.e_tag.unwrap_or_default()))
        })
        .await
    }

    /// One unconditional GET of the whole object, for the streaming paths.
    async fn get_whole(
        &self,
        key: &str,
    ) -> std::result::Result<aws_sdk_s3::operation::get_object::GetObjectOutput, Fail> {
        self.client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.classify("get", key, Target::Object, e))
    }

    fn body_error(&self, e: impl fmt::Display) -> Fail {
        Fail::Transient(self.scrub(format!("reading the response body: {e}")))
    }

    async fn get_to_file_impl(&self, key: &str, path: &Path) -> Result<ObjectMeta> {
        use tokio::io::AsyncWriteExt;
        self.retrying("get", key, || async {
            let out = self.get_whole(key).await?;
            let local = |e| Fail::Fatal(local_io("get", key, path, e));
            // Truncated on every attempt: a retry writes the object from its start.
            let mut f = tokio::fs::File::create(path).await.map_err(local)?;
            let mut body = out.body;
            let mut size = 0u64;
            while let Some(chunk) = body.try_next().await.map_err(|e| self.body_error(e))? {
                f.write_all(&chunk).await.map_err(local)?;
                size += chunk.len() as u64;
            }
            f.flush().await.map_err(local)?;
            Ok(ObjectMeta {
                key: key.to_string(),
                size,
                etag: out.e_tag.unwrap_or_default(),
                last_modified: out.last_modified.as_ref().and_then(to_chrono),
            })
        })
        .await
    }

    async fn list_impl(&self, prefix: &str, max_total: Option<usize>) -> Result<Vec<ObjectMeta>> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        let mut page_size = self.opts.list_page_size.clamp(1, 1000);
        if let Some(m) = max_total {
            page_size = page_size.min(m.clamp(1, 1000) as i32);
        }
        loop {
            let page = self
                .retrying("list", prefix, || async {
                    self.client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(prefix)
                        .max_keys(page_size)
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| self.classify("list", prefix, Target::Bucket, e))
                })
                .await?;
            all.extend(page.contents().iter().filter_map(|o| {
                Some(ObjectMeta {
                    key: o.key()?.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().unwrap_or_default().to_string(),
                    last_modified: o.last_modified().and_then(to_chrono),
                })
            }));
            if max_total.is_some_and(|m| all.len() >= m) || page.is_truncated() != Some(true) {
                return Ok(all);
            }
            match page.next_continuation_token() {
                Some(next) if token.as_deref() != Some(next) => token = Some(next.to_string()),
                // Truncated without a new token: following it would loop forever.
                _ => return Err(StoreError::Other {
                    op: "list",
                    key: prefix.to_string(),
                    detail:
                        "the server reported a truncated listing without a new continuation token"
                            .into(),
                }),
            }
        }
    }

    async fn delete_impl(&self, key: &str) -> Result<()> {
        let r = self
            .retrying("delete", key, || async {
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.classify("delete", key, Target::Object, e))
            })
            .await;
        match r {
            Err(StoreError::NotFound { .. }) => Ok(()),
            r => r,
        }
    }
}

fn to_chrono(t: &aws_smithy_types::DateTime) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos())
}

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("{} (bucket {})", self.endpoint, self.bucket)
    }

    fn check_bucket<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.list_impl(prefix, Some(1)).await.map(|_| ()) })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<GetResult>> {
        Box::pin(async move {
            self.get_impl(key, None)
                .await?
                .ok_or_else(|| StoreError::Other {
                    op: "get",
                    key: key.to_string(),
                    detail: "unexpected 304 for an unconditional get".into(),
                })
        })
    }

    fn get_if_none_match<'a>(
        &'a self,
        key: &'a str,
        etag: &'a str,
    ) -> BoxFuture<'a, Result<Option<GetResult>>> {
        Box::pin(self.get_impl(key, Some(etag)))
    }

    fn get_range<'a>(&'a self, key: &'a str, start: u64, len: u64) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(self.get_range_impl(key, start, len))
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(self.head_impl(key))
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        body: Bytes,
        mode: PutMode,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(self.put_impl(key, Body::Bytes(body), mode))
    }

    fn put_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
        mode: PutMode,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(self.put_impl(key, Body::File(path), mode))
    }

    fn get_to_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(self.get_to_file_impl(key, path))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>>> {
        Box::pin(self.list_impl(prefix, None))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.delete_impl(key))
    }
}

mod fail;

use fail::*;
