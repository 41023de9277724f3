//! The S3 backend (`aws-sdk-s3`): any S3-compatible server (AWS, SeaweedFS, Ceph RGW).
//!
//! Conditional puts are `If-None-Match: *`; the server answers 412 when the key exists.
//! Integrity is end-to-end (every chunk is addressed by its SHA-256 and verified when
//! read), so the SDK's own request checksums are only sent where S3 requires them.
//!
//! Every request is bounded ([`Limits`]): the SDK's standard retry mode (exponential
//! backoff with full jitter, a retry quota) tries an operation at most 5 times; a
//! connection, the first byte of a response, one attempt and the whole operation each
//! have a timeout, and a response body that stops flowing fails (stalled-stream
//! protection) and is fetched again a bounded number of times. A stalled or failing
//! server makes an operation fail with [`StoreError::Backend`], never hang.

use crate::store::{check_key, ObjectStore, StoreError};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use std::time::Duration;

/// Tries of one operation, the first included (the SDK retries throttling, 5xx,
/// timeouts and broken connections; not 4xx).
const MAX_ATTEMPTS: u32 = 5;
/// Reads of one object whose response body broke off part way (the SDK does not retry
/// a streamed body: [`S3Store::get`] sends the request again).
const BODY_TRIES: u32 = 3;

/// How long a request may take and how often it is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    /// The first retry waits up to this (jittered: uniformly 0 to it), doubling.
    initial_backoff: Duration,
    /// No wait between tries is longer.
    max_backoff: Duration,
    /// Connecting (TCP and TLS).
    connect: Duration,
    /// From sending a request to the first byte of its response.
    first_byte: Duration,
    /// One try of an operation, its response read.
    attempt: Duration,
    /// The whole operation, every try and wait included.
    operation: Duration,
    /// A response body that sends nothing for this long fails.
    body_stall: Duration,
}

impl Limits {
    /// Servers on a LAN or a region away: a 1 MiB chunk takes well under a second; a
    /// stalled server costs an operation at most `operation`.
    const DEFAULT: Limits = Limits {
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(20),
        connect: Duration::from_secs(5),
        first_byte: Duration::from_secs(20),
        attempt: Duration::from_secs(30),
        operation: Duration::from_secs(90),
        body_stall: Duration::from_secs(10),
    };

    /// Every bound scaled from one attempt's timeout (the test hook).
    fn scaled(attempt: Duration) -> Self {
        Limits {
            initial_backoff: (attempt / 10).max(Duration::from_millis(10)),
            max_backoff: attempt,
            connect: attempt.min(Self::DEFAULT.connect),
            first_byte: attempt,
            attempt,
            // Every try timing out, and a wait of at most `attempt` after each.
            operation: attempt * (2 * MAX_ATTEMPTS),
            body_stall: attempt,
        }
    }

    /// The defaults; in debug builds `NULLSPACE_TEST_S3_ATTEMPT_TIMEOUT_MS` (a test hook,
    /// for the storage-fault tests) scales every bound from one attempt's timeout.
    fn from_env() -> Self {
        #[cfg(debug_assertions)]
        {
            if let Some(ms) = std::env::var("NULLSPACE_TEST_S3_ATTEMPT_TIMEOUT_MS")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                let limits = Self::scaled(Duration::from_millis(ms.max(100)));
                tracing::warn!(
                    ?limits,
                    "test hook: S3 timeouts scaled (NULLSPACE_TEST_S3_ATTEMPT_TIMEOUT_MS)"
                );
                return limits;
            }
        }
        Self::DEFAULT
    }

    /// The wait before fetching a broken-off body again (`tries` so far: 1, 2, ...):
    /// exponential with full jitter, like the SDK's own.
    fn body_backoff(&self, tries: u32) -> Duration {
        let cap = self
            .initial_backoff
            .saturating_mul(1u32 << tries.saturating_sub(1).min(16))
            .min(self.max_backoff);
        let unit = (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0;
        cap.mul_f64(unit)
    }
}

/// Where and how to reach an S3 bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `http(s)://host:port` of the S3 endpoint.
    pub endpoint: String,
    pub bucket: String,
    /// Prefix of every key (`""` for none).
    pub prefix: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

/// Objects in an S3 bucket, under a key prefix.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    /// The endpoint as configured (for [`S3Store::identity`]).
    endpoint: String,
    bucket: String,
    prefix: String,
    limits: Limits,
}

fn backend<'a, E: std::error::Error + 'static>(
    op: &'static str,
    key: &'a str,
) -> impl FnOnce(E) -> StoreError + 'a {
    move |e| StoreError::Backend {
        op,
        key: key.to_string(),
        message: chain(&e),
    }
}

/// [`backend`] for a request's error: a server's answer as its status, code and
/// message; anything else (timeouts, broken connections) as its chain of causes.
fn request_failed<'a, E: ProvideErrorMetadata + std::error::Error + 'static>(
    op: &'static str,
    key: &'a str,
) -> impl FnOnce(SdkError<E, HttpResponse>) -> StoreError + 'a {
    move |e| {
        let message = match e.as_service_error() {
            Some(s) => format!(
                "the server answered {} {}: {}",
                e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0),
                s.code().unwrap_or("(no code)"),
                s.message().unwrap_or("(no message)")
            ),
            None => chain(&e),
        };
        StoreError::Backend {
            op,
            key: key.to_string(),
            message,
        }
    }
}

/// An error and its causes, `: `-joined, each said once (no debug dumps).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        source = s.source();
    }
    out
}

/// The service error code of an SDK error (`NoSuchKey`, `PreconditionFailed`, ...).
fn service_code<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<&str> {
    e.as_service_error().and_then(|s| s.code())
}

impl S3Store {
    /// Connects (lazily: no request is made until the first operation).
    pub fn new(config: &S3Config) -> Self {
        Self::with_limits(config, Limits::from_env())
    }

    /// `<endpoint>/<bucket>/<prefix>`: equal for two stores that read and write the
    /// same objects.
    pub fn identity(&self) -> String {
        format!("{}/{}/{}", self.endpoint, self.bucket, self.prefix)
    }

    fn with_limits(config: &S3Config, limits: Limits) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .endpoint_url(&config.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                &config.access_key,
                &config.secret_key,
                None,
                None,
                "nullspace-config",
            ))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .http_client(http)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(MAX_ATTEMPTS)
                    .with_initial_backoff(limits.initial_backoff)
                    .with_max_backoff(limits.max_backoff),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(limits.connect)
                    .read_timeout(limits.first_byte)
                    .operation_attempt_timeout(limits.attempt)
                    .operation_timeout(limits.operation)
                    .build(),
            )
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled()
                    .grace_period(limits.body_stall)
                    .build(),
            )
            .build();
        let prefix = config.prefix.trim_matches('/');
        Self {
            client: Client::from_conf(conf),
            endpoint: config.endpoint.trim_end_matches('/').to_string(),
            bucket: config.bucket.clone(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            limits,
        }
    }

    /// The SDK client the store sends its requests with (benchmarks measure raw
    /// requests against the store's with it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The bucket it stores in.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Creates the bucket if it does not exist; fails with the server's reason if it
    /// cannot be reached.
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                if matches!(
                    service_code(&e),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) {
                    Ok(())
                } else {
                    Err(request_failed("create bucket", &self.bucket)(e))
                }
            }
        }
    }

    fn full_key(&self, key: &str) -> Result<String, StoreError> {
        check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }
}

impl ObjectStore for S3Store {
    async fn put(&self, key: &str, data: bytes::Bytes) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(request_failed("put", key))?;
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: bytes::Bytes) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        match self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .if_none_match("*")
            .body(ByteStream::from(data))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let precondition = matches!(
                    service_code(&e),
                    Some("PreconditionFailed" | "ConditionalRequestConflict")
                ) || e.raw_response().map(|r| r.status().as_u16()) == Some(412);
                if precondition {
                    Err(StoreError::AlreadyExists(key.to_string()))
                } else {
                    Err(request_failed("conditional put", key)(e))
                }
            }
        }
    }

    async fn get(&self, key: &str) -> Result<bytes::Bytes, StoreError> {
        let full = self.full_key(key)?;
        let mut tries = 0;
        loop {
            tries += 1;
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    let not_found = e.as_service_error().is_some_and(|s| s.is_no_such_key())
                        || e.raw_response().map(|r| r.status().as_u16()) == Some(404);
                    return Err(if not_found {
                        StoreError::NotFound(key.to_string())
                    } else {
                        request_failed("get", key)(e)
                    });
                }
            };
            // The SDK's retries end with the response head: a body that breaks off or
            // stalls is fetched again here, a bounded number of times.
            match out.body.collect().await {
                Ok(body) => return Ok(body.into_bytes()),
                Err(e) if tries < BODY_TRIES => {
                    let wait = self.limits.body_backoff(tries);
                    tracing::warn!(key, tries, ?wait, error = %chain(&e), "reading an object broke off; fetching it again");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(backend("read", key)(e)),
            }
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let full = self.full_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => {
                let not_found = e.as_service_error().is_some_and(|s| s.is_not_found())
                    || e.raw_response().map(|r| r.status().as_u16()) == Some(404);
                if not_found {
                    Ok(false)
                } else {
                    Err(request_failed("head", key)(e))
                }
            }
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(format!("{}{prefix}", self.prefix))
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(request_failed("list", prefix))?;
            for obj in page.contents() {
                if let Some(k) = obj.key().and_then(|k| k.strip_prefix(&self.prefix)) {
                    out.push(k.to_string());
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(request_failed("delete", key))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bound_is_finite_and_an_operation_outlasts_its_attempts() {
        for l in [Limits::DEFAULT, Limits::scaled(Duration::from_millis(800))] {
            assert!(l.connect <= l.attempt && l.first_byte <= l.attempt, "{l:?}");
            assert!(l.attempt < l.operation, "{l:?}");
            assert!(l.initial_backoff <= l.max_backoff, "{l:?}");
        }
        let t = Limits::scaled(Duration::from_millis(800));
        assert_eq!(t.operation, Duration::from_millis(8000));
        assert_eq!(t.initial_backoff, Duration::from_millis(80));
    }

    #[test]
    fn body_retries_back_off_exponentially_with_jitter() {
        let l = Limits::DEFAULT;
        let waits: Vec<Duration> = (0..64).map(|_| l.body_backoff(2)).collect();
        assert!(
            waits.iter().all(|w| *w <= Duration::from_secs(2)),
            "{waits:?}"
        );
        assert!(
            waits.iter().any(|w| *w != waits[0]),
            "jittered: not all equal {waits:?}"
        );
        assert!(l.body_backoff(30) <= l.max_backoff);
    }
}
